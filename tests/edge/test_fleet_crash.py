"""SIGKILL the fleet agent at every step of an install; on restart it must serve a
complete, verified version, resume the rollout and end in a consistent state."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.fleet_state import StateStore
from edge.staging import STAGING_PREFIX, verify_version
from harness.broker import Broker
from harness.onnx_models import dense_model
from shared.manifest import generate_key, public_key_text
from tests.conftest import ROOT
from tests.edge.fleet_support import (
    ArtifactServer,
    Controller,
    pack,
    signed_order,
    write_repository,
)


class DeviceProcess:
    """``tests.edge.fleet_device`` in a subprocess, its JSON lines on a queue."""

    def __init__(self, root: Path, broker: Broker, key: str, device: str, pause: str | None):
        args = [sys.executable, "-m", "tests.edge.fleet_device", str(root), broker.url, key, device]
        self.process = subprocess.Popen(
            [*args, *([pause] if pause else [])],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(root / f"device-{time.monotonic_ns()}.log", "wb"),  # noqa: SIM115
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def wait_for(self, key: str, value: Any = None, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if key in line and (value is None or line[key] == value):
                return line

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer().start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "pause",
    ["mid-download", "verified", "staged", "self_tested", "switching", "switched", "committing"],
)
def test_sigkill_at_any_step_leaves_a_serving_device(
    tmp_path: Path,
    broker: Broker,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
    pause: str,
) -> None:
    device = f"crash-{uuid.uuid4().hex[:8]}"
    write_repository(tmp_path / "repository", {1: dense_model(seed=1)})
    public = public_key_text(key)
    controller = Controller(broker.url, key)
    artifact = pack(dense_model(seed=2), 2) + b"\0" * (1 << 20)  # tar padding: still valid
    order = signed_order(key, artifacts, artifact, version=2, health_window_s=0.5)
    model_dir = tmp_path / "repository" / "dense"
    first = DeviceProcess(
        tmp_path, broker, public, device, None if pause == "mid-download" else pause
    )
    try:
        first.wait_for("serving", 1)
        if pause == "mid-download":
            artifacts.delay_s = 0.05
        controller.send(device, order)
        if pause == "mid-download":
            part = model_dir / f"{STAGING_PREFIX}2.part"
            deadline = time.monotonic() + 20
            while not (part.exists() and part.stat().st_size > 0):
                assert time.monotonic() < deadline, "the download never started"
                time.sleep(0.01)
        else:
            first.wait_for("step", pause)
        first.kill()
        artifacts.delay_s = 0.0
        # The broker publishes the last will at once: the device is offline.
        controller.wait(lambda: controller.statuses.get(device, {}).get("online") is False)

        second = DeviceProcess(tmp_path, broker, public, device, None)
        try:
            served = second.wait_for("serving")["serving"]
            assert served in (1, 2)  # it answered a request: a complete version loads
            assert verify_version(model_dir / str(served)) in (None, "no verification marker")
            controller.wait_step(order.rollout_id, "committed", timeout_s=30)
        finally:
            second.kill()
    finally:
        artifacts.delay_s = 0.0
        controller.stop()
        if first.process.poll() is None:  # a failure before the kill: never leave it running
            first.kill()

    state = StateStore(tmp_path / "data" / "fleet" / "state.json").load().models["dense"]
    assert (state.active, state.previous, state.phase, state.pending) == (2, 1, "committed", None)
    assert order.signed_manifest is not None
    digest = order.signed_manifest.manifest.sha256
    assert verify_version(model_dir / "2", digest) is None
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.json"]
    if pause == "mid-download":
        resumed = [r for name, r in artifacts.requests if r and name == digest]
        assert resumed, "the second run did not resume the download with a Range request"


def test_fleet_agent_command_pins_versions_in_the_control_file(
    tmp_path: Path, broker: Broker, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    write_repository(tmp_path / "repository", {1: dense_model(seed=1)})
    config = tmp_path / "edge.toml"
    config.write_text(
        f'device_id = "cli-dev"\nmqtt_url = "{broker.url}"\n'
        f'repository = "{tmp_path / "repository"}"\ndata_dir = "{tmp_path / "data"}"\n'
        '[runtime]\nbackend = "onnxruntime"\nproviders = ["CPUExecutionProvider"]\n'
        f'[fleet]\ntrusted_keys = ["{public_key_text(key)}"]\nlabels = {{site = "lab"}}\n'
        "min_requests = 0\n"  # no server answers requests here
    )
    code = "from edge.fleet_cli import fleet_agent_command; fleet_agent_command()"
    process = subprocess.Popen([sys.executable, "-c", code, "--config", str(config)], cwd=ROOT)
    controller = Controller(broker.url, key)
    try:
        controller.wait(lambda: controller.statuses.get("cli-dev", {}).get("online") is True)
        assert controller.statuses["cli-dev"]["labels"] == {"site": "lab"}
        order = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
        controller.send("cli-dev", order)
        controller.wait_step(order.rollout_id, "committed")
        control = json.loads((tmp_path / "data" / "run" / "repository.json").read_text())
        assert control["dense"]["versions"] == [2]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        controller.wait(lambda: controller.statuses["cli-dev"]["online"] is False)
    finally:
        if process.poll() is None:
            process.kill()
        controller.clear("cli-dev")
        controller.stop()
