"""One simulated device in a process of its own, for the crash tests (SIGKILL at a step).

``python -m tests.edge.fleet_device ROOT BROKER_URL PUBLIC_KEY DEVICE [PAUSE_STEP]`` serves
``ROOT/repository`` in-process with a fleet agent. It prints one JSON line per install
step, pauses forever at ``PAUSE_STEP`` (so the test can kill it there), and prints
``{"serving": version}`` once it answered a request after start-up.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edge.fleet_agent import FleetAgent
from edge.fleet_target import RepositoryTarget
from edge.health import HealthRecorder
from edge.settings import load_settings
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions

_SAY = threading.Lock()


def say(**fields: object) -> None:
    """One JSON line on stdout. Several threads say things: ``print`` writes the text and
    the newline separately, so two lines could interleave into one the reader cannot parse."""
    line = json.dumps(fields) + "\n"
    with _SAY:
        sys.stdout.write(line)
        sys.stdout.flush()


def main() -> None:
    root, broker, key, device = sys.argv[1:5]
    pause = sys.argv[5] if len(sys.argv) > 5 else None
    settings = load_settings(
        None,
        device_id=device,
        data_dir=Path(root) / "data",
        repository=Path(root) / "repository",
        mqtt_url=broker,
        runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        fleet={"trusted_keys": [key], "status_interval_s": 5.0, "min_requests": 0},
    )
    repository = ModelRepository(
        settings.repository,
        RuntimeOptions(providers=("CPUExecutionProvider",)),
        backend="onnxruntime",
    )

    def hook(step: str, model: str, version: int) -> None:
        say(step=step, version=version)
        if step == pause:
            while True:
                time.sleep(1)

    agent = FleetAgent(
        settings, RepositoryTarget(repository), health=HealthRecorder(), step_hook=hook
    )
    agent.start()
    if "dense" not in repository.served():
        repository.load("dense")  # not managed yet: the operator's version
    runtime = repository.get("dense")
    outputs = runtime.infer({"x": np.ones((1, 4), dtype=np.float32)}).outputs
    assert np.all(np.isfinite(outputs["y"]))
    say(serving=int(runtime.version))
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
