"""The sensor bridge as users run it, for integration tests: its process, a results collector,
its config, and readings the cascade's student is unsure of."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from models.digits import load_split
from serving.confidence import confidence
from shared.mqtt import Message, MqttClient
from shared.shutdown import ShutdownSignals

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"

CASCADE_CONFIG = """\
device_id = "{device}"
data_dir = "{data_dir}"
mqtt_url = "{cloud_url}"
repository = "{repository}"
models = ["digits-student"]

[runtime]
backend = "onnxruntime"
providers = ["CPUExecutionProvider"]

[uplink]
timeout_s = {timeout_s}
attempt_timeout_s = {attempt_timeout_s}
breaker_cooldown_s = 0.5

[routes.digits-teacher]
mode = "cloud"

[routes.digits]
mode = "cascade"
local_model = "digits-student"
cloud_model = "digits-teacher"
threshold = {threshold}

[sensors]
broker_url = "{device_url}"
corrections = true
metrics_port = 0
batches_in_flight = {in_flight}

[sensors.batch]
max_messages = 64
max_delay_ms = 5
"""


def write_cascade_config(
    path: Path,
    *,
    device: str,
    data_dir: Path,
    device_url: str,
    cloud_url: str,
    threshold: float,
    in_flight: int = 4,
    timeout_s: float = 2.0,
    attempt_timeout_s: float = 0.6,
) -> Path:
    """An agent config whose bridge answers ``tether/<device>/sensors/+/data`` with the
    ``digits`` cascade (``digits-student`` over ``digits-teacher``), corrections on."""
    path.write_text(
        CASCADE_CONFIG.format(
            device=device,
            data_dir=data_dir,
            cloud_url=cloud_url,
            device_url=device_url,
            repository=REPOSITORY,
            threshold=threshold,
            in_flight=in_flight,
            timeout_s=timeout_s,
            attempt_timeout_s=attempt_timeout_s,
        )
    )
    return path


def unsure_rows(threshold: float, count: int = 256, seed: int = 0) -> np.ndarray:
    """Digits inputs the student is unsure of: blends of two test digits whose
    ``max_probability`` under ``digits-student`` is below ``threshold - 0.1``."""
    pixels, _ = load_split("test")
    session = ort.InferenceSession(
        str(REPOSITORY / "digits-student" / "1" / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    while len(found) < count:
        i, j = rng.integers(0, len(pixels), 512), rng.integers(0, len(pixels), 512)
        blends = np.round((pixels[i] + pixels[j]) / 2).astype(np.float32)
        (scores,) = session.run(None, {"pixels": blends})
        found.extend(blends[confidence(scores, "max_probability") < threshold - 0.1])
    return np.stack(found[:count])


class BridgeProcess:
    """``python -m edge.bridge_cli --config FILE`` as a real process."""

    def __init__(self, config: Path, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "bridge.log"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edge.bridge_cli", "--config", str(self.config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=log,
        )

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until the bridge reports itself connected (its models are loaded by then)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.process.returncode}: {self.log()}")
            stats = self.stats()
            if stats and stats.get("pid") == self.process.pid and stats.get("connected"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"bridge not ready within {timeout_s}s: {self.log()}")

    def stats(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.data_dir / "run" / "sensor-bridge.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""


class Collector:
    """Everything the bridge publishes for ``device`` on the device broker, by reading id.

    The subscriber runs in a process of its own (``python -m harness.sensor_stack collect``),
    which writes each payload as a line to a file. In the test's process its PUBACKs would
    wait for the GIL behind the test's own publishing loop, and a stock broker keeps at
    most 20 messages in flight and 1000 queued for a subscriber: what queues past that is
    dropped at the broker, a loss of the test's subscriber, not of the bridge.
    """

    def __init__(self, url: str, device: str) -> None:
        self.lock = threading.Lock()
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        self.kinds: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(
            lambda: defaultdict(list)
        )
        #: (sensor topic level, kind, seq) in the order they came.
        self.arrivals: list[tuple[str, str, Any]] = []
        self.client = CollectorProcess(url, device)
        self._offset = 0
        self._partial = b""

    def _parse_pending(self) -> None:
        """Parse what the subscriber wrote since the last look (under ``self.lock``)."""
        path = self.client.output
        if not path.exists():
            return
        with open(path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next look
        for payload in lines:
            body = json.loads(payload)
            self.messages[f"{body['kind']}:{body['reading_id']}"].append(payload)
            self.kinds[body["kind"]][body["reading_id"]].append(body)
            self.arrivals.append((body.get("sensor"), body["kind"], body.get("seq")))

    def arrival_order(self) -> list[tuple[str, str, Any]]:
        """(sensor topic level, kind, seq) of everything received, in arrival order."""
        with self.lock:
            self._parse_pending()
            return list(self.arrivals)

    def ids(self, kind: str) -> set[str]:
        with self.lock:
            self._parse_pending()
            return set(self.kinds[kind])

    def of(self, kind: str) -> dict[str, list[dict[str, Any]]]:
        with self.lock:
            self._parse_pending()
            return {k: list(v) for k, v in self.kinds[kind].items()}


class CollectorProcess:
    """The collector's subscriber process: ``start()`` returns once it is subscribed."""

    def __init__(self, url: str, device: str) -> None:
        self.url = url
        self.device = device
        self.output = Path(tempfile.mkdtemp(prefix="collector-")) / "messages.jsonl"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "harness.sensor_stack", "collect", self.url, self.device,
             str(self.output)],
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )  # fmt: skip
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"subscribed":
            raise RuntimeError("the collector could not subscribe")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def collect(url: str, device: str, output: str) -> None:
    """The subscriber: every result and error for ``device``, a line each, flushed at once."""
    stop = ShutdownSignals((signal.SIGTERM,))
    stop.install()
    with open(output, "ab", buffering=0) as sink:

        def on(message: Message) -> None:
            sink.write(message.payload + b"\n")

        client = MqttClient(url, f"collector-{uuid.uuid4().hex[:6]}", receive_maximum=65_535)
        client.subscribe(f"tether/{device}/sensors/+/inference", on, qos=1)
        client.subscribe(f"tether/{device}/sensors/+/errors", on, qos=1)
        client.start()
        for topic in ("inference", "errors"):
            if not client.wait_subscribed(f"tether/{device}/sensors/+/{topic}", 10):
                raise SystemExit(f"not subscribed to {topic}")
        print("subscribed", flush=True)
        stop.wait()
        client.stop()


class CloudWorkerProcess:
    """``python -m tether cloud`` serving ``models`` on ``broker`` in its own process."""

    def __init__(self, broker_url: str, models: list[str], log_path: Path) -> None:
        self.broker_url = broker_url
        self.models = models
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> CloudWorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115
        command = [
            sys.executable, "-m", "tether", "cloud", "--mqtt-url", self.broker_url,
            "--repository", str(REPOSITORY), "--models", ",".join(self.models),
            "--worker-id", f"cw-{uuid.uuid4().hex[:6]}", "--metrics-port", "0",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=log,
        )
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until one request is answered (models loaded, subscribed)."""
        from edge.settings import UplinkSettings
        from edge.uplink import Uplink

        uplink = Uplink(self.broker_url, f"probe-{uuid.uuid4().hex[:6]}", UplinkSettings())
        uplink.start()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                assert self.process is not None and self.process.poll() is None, self.log()
                try:
                    uplink.request(
                        self.models[0], {"pixels": np.zeros((1, 64), np.float32)}, timeout_s=1.0
                    )
                    return
                except Exception:  # not up yet
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        finally:
            uplink.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""


if __name__ == "__main__":
    if sys.argv[1:2] == ["collect"]:
        collect(*sys.argv[2:5])
