"""Sensor bridge benchmark (run by hand, not in CI): ``python bench/sensors.py``.

Measures, in one run on one machine, with one Mosquitto:

1. the broker's floor: a QoS 1 publisher -> broker -> QoS 1 subscriber pipe of the same
   payloads (messages/s, first publish to last delivery);
2. readings/s through the bridge (``python -m edge.bridge_cli``, a process of its own) on
   ``digits-student`` (local route), from the first reading published to the last result
   received, without micro-batching (``max_messages = 1``) and with it (64 / 5 ms).

Target: the bridge with micro-batching sustains at least 50% of the floor's messages/s.
Writes a Markdown table to stdout and ``bench/results/sensors.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.digits import load_split  # noqa: E402
from shared.mqtt import Message, MqttClient  # noqa: E402
from tests.broker import Broker  # noqa: E402

DEVICE = "bench-dev"
CONFIG = """\
device_id = "{device}"
data_dir = "{data_dir}"
mqtt_url = "{url}"
repository = "{repository}"
models = ["digits-student"]

[runtime]
backend = "onnxruntime"
providers = ["CPUExecutionProvider"]

[sensors]
metrics_port = 0
queue_size = {queue}

[[sensors.bindings]]
model = "digits-student"

[sensors.batch]
max_messages = {batch}
max_delay_ms = {delay}
"""


def payloads(count: int) -> list[bytes]:
    pixels, _ = load_split("test")
    return [
        json.dumps({"id": f"r{i}", "data": pixels[i % len(pixels)].tolist()}).encode()
        for i in range(count)
    ]


class Counter:
    """Counts messages on a subscription and notes when the last one came."""

    def __init__(self, url: str, topic: str, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.last = 0.0
        self.done = threading.Event()
        self.client = MqttClient(url, f"bench-sub-{uuid.uuid4().hex[:6]}")
        self.client.subscribe(topic, self._on, qos=1)
        self.client.start()

    def _on(self, message: Message) -> None:
        self.count += 1
        if self.count >= self.expected:
            self.last = time.perf_counter()
            self.done.set()


def publish_all(url: str, topics: list[str], bodies: list[bytes]) -> float:
    """Publish every body at QoS 1 as fast as the client goes; returns the start time."""
    client = MqttClient(url, f"bench-pub-{uuid.uuid4().hex[:6]}", max_inflight=1000)
    client.start()
    started = time.perf_counter()
    infos = [client.publish(topics[i % len(topics)], body, qos=1) for i, body in enumerate(bodies)]
    for info in infos:
        info.wait_for_publish(60)
    client.stop()
    return started


def floor(broker: Broker, bodies: list[bytes]) -> float:
    counter = Counter(broker.url, "bench/floor/+/data", len(bodies))
    time.sleep(0.3)
    started = publish_all(broker.url, [f"bench/floor/s{i}/data" for i in range(50)], bodies)
    counter.done.wait(120)
    counter.client.stop()
    return len(bodies) / (counter.last - started)


def through_bridge(broker: Broker, bodies: list[bytes], batch: int, delay_ms: float) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        config = data_dir / "bridge.toml"
        config.write_text(
            CONFIG.format(
                device=DEVICE,
                data_dir=data_dir,
                url=broker.url,
                repository=ROOT / "models" / "repository",
                batch=batch,
                delay=delay_ms,
                queue=max(256, 4 * batch),
            )
        )
        log = open(data_dir / "bridge.log", "wb")  # noqa: SIM115
        process = subprocess.Popen(
            [sys.executable, "-m", "edge.bridge_cli", "--config", str(config)],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log,
            stderr=log,
        )
        try:
            stats = data_dir / "run" / "sensor-bridge.json"
            deadline = time.monotonic() + 60
            while not (stats.is_file() and json.loads(stats.read_text()).get("connected")):
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((data_dir / "bridge.log").read_text()[-2000:])
                time.sleep(0.1)
            counter = Counter(broker.url, f"tether/{DEVICE}/sensors/+/inference", len(bodies))
            time.sleep(0.3)
            topics = [f"tether/{DEVICE}/sensors/s{i}/data" for i in range(50)]
            started = publish_all(broker.url, topics, bodies)
            if not counter.done.wait(300):
                raise RuntimeError(f"only {counter.count} of {len(bodies)} results")
            counter.client.stop()
            return len(bodies) / (counter.last - started)
        finally:
            process.terminate()
            process.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    bodies = payloads(args.readings)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp)).start()
        try:
            cases = [
                ("broker floor: publish -> subscribe, QoS 1", lambda: floor(broker, bodies)),
                (
                    "bridge, no micro-batching (1 message)",
                    lambda: through_bridge(broker, bodies, 1, 0),
                ),
                (
                    "bridge, micro-batching (64 messages / 5 ms)",
                    lambda: through_bridge(broker, bodies, 64, 5),
                ),
            ]
            for name, run in cases:
                rates = [run() for _ in range(args.runs)]
                rows.append((name, statistics.median(rates)))
                print(f"{name}: {', '.join(f'{r:,.0f}' for r in rates)} msg/s", flush=True)
        finally:
            broker.stop()
    base = rows[0][1]
    lines = [
        f'{args.readings:,} JSON readings (`{{"id", "data": [64 floats]}}`, ~{len(bodies[0])} B), '
        f"median of {args.runs} runs, {os.cpu_count()} CPUs",
        "",
        "| pipe | messages/s | share of the floor |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {rate:,.0f} | {rate / base:.0%} |" for name, rate in rows],
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "bench" / "results" / "sensors.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
