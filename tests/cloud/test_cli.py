"""``python -m cloud.cli``: a real worker process drains on SIGTERM and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from harness.broker import Broker
from tests.cloud.conftest import Asker

ROOT = Path(__file__).resolve().parents[2]


def start_worker(tmp_path: Path, broker: Broker, repository_dir: Path) -> subprocess.Popen[str]:
    config = tmp_path / "cloud.toml"
    config.write_text(
        f'repository = "{repository_dir}"\n'
        'models = ["dense"]\n'
        'share_group = "cli-test"\n'
        "metrics_port = 0\n"
        "worker_threads = 1\n"
        "[batching]\n"
        "max_batch_size = 4\n"
        "max_queue_delay_ms = 400\n"
        "[runtime]\n"
        'backend = "onnxruntime"\n'
        'providers = ["CPUExecutionProvider"]\n'
    )
    env = {**os.environ, "TETHER_MQTT_URL": broker.url}
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "--config", str(config), "--worker-id", "cli-worker"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    until = time.monotonic() + 20
    for line in process.stderr:
        if "ready" in line:
            return process
        if time.monotonic() > until:
            break
    process.kill()
    raise AssertionError(f"worker did not become ready: {process.stderr.read()}")


def test_sigterm_drains_queued_requests_then_exits_zero(
    tmp_path: Path, broker: Broker, repository_dir: Path
) -> None:
    process = start_worker(tmp_path, broker, repository_dir)
    asker = Asker(broker)
    try:
        # Batching waits up to 400 ms for more rows, so these are still queued at SIGTERM.
        for i in range(3):
            asker.ask("dense", np.full((1, 4), i, dtype=np.float32))
        process.send_signal(signal.SIGTERM)
        replies = asker.collect(3, timeout_s=10)
        assert all(r.kind == "infer_response" for r in replies)
        assert all(r.header["worker"] == "cli-worker" for r in replies)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        asker.close()
