"""Sensor bridge benchmark (run by hand, not in CI): ``python bench/sensors.py``.

Measures, in one run on one machine:

1. on Tether's tuned Mosquitto, the broker's floor: a QoS 1 publisher -> broker -> QoS 1
   subscriber pipe of the same payloads (messages/s, first publish to last delivery);
2. readings/s through the bridge (``python -m edge.bridge_cli``, a process of its own) on
   ``digits-student`` (local route), from the first reading published to the last result
   received, without micro-batching (``max_messages = 1``) and with it (64 / 5 ms);
3. on stock Mosquittos (a device broker and a cloud broker, only ``listener`` and
   ``allow_anonymous``), every reading escalated: the ``digits`` cascade on inputs the
   student is unsure of, a cloud worker (``tether cloud``, its own process) serving
   ``digits-teacher``. First the cloud worker's own rate for the bridge's micro-batches
   (64 rows a request, as many in flight as the bridge's ``batches_in_flight``, straight
   from an uplink), then the bridge's readings/s with that worker.

Targets: the bridge with micro-batching sustains at least 50% of the floor's messages/s;
with every reading escalated, the bridge's readings/s are at least 50% of the cloud
worker's own requests/s for the same micro-batches.
Writes Markdown tables to stdout and ``bench/results/sensors.md``.
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

import numpy as np  # noqa: E402

from edge.settings import UplinkSettings  # noqa: E402
from edge.uplink import Uplink  # noqa: E402
from harness.broker import Broker  # noqa: E402
from harness.sensor_stack import (  # noqa: E402
    CloudWorkerProcess,
    unsure_rows,
    write_cascade_config,
)
from models.digits import load_split  # noqa: E402
from shared.mqtt import Message, MqttClient  # noqa: E402

THRESHOLD = 0.7
MICRO_BATCH = 64
IN_FLIGHT = 4

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
        # a large Receive Maximum: a stock broker queues only 1000 for a slow subscriber
        self.client = MqttClient(url, f"bench-sub-{uuid.uuid4().hex[:6]}", receive_maximum=65_535)
        self.client.subscribe(topic, self._on, qos=1)
        self.client.start()
        self.client.wait_subscribed(topic, 10)

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
            )
        )
        return run_bridge(config, data_dir, broker, bodies)


def run_bridge(config: Path, data_dir: Path, broker: Broker, bodies: list[bytes]) -> float:
    """Readings/s of a bridge process on ``config``: first reading published to last result."""
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
        topics = [f"tether/{DEVICE}/sensors/s{i}/data" for i in range(50)]
        started = publish_all(broker.url, topics, bodies)
        if not counter.done.wait(300):
            raise RuntimeError(f"only {counter.count} of {len(bodies)} results")
        counter.client.stop()
        return len(bodies) / (counter.last - started)
    finally:
        process.terminate()
        process.wait(30)


def escalated_payloads(count: int) -> list[bytes]:
    """Readings the student is unsure of: every one is escalated by the cascade."""
    rows = unsure_rows(THRESHOLD)
    return [
        json.dumps({"id": f"e{i}", "data": rows[i % len(rows)].tolist()}).encode()
        for i in range(count)
    ]


def cloud_worker_rate(url: str, seconds: float) -> float:
    """Requests/s of the cloud worker for 64-row micro-batches, ``IN_FLIGHT`` at a time."""
    batch = unsure_rows(THRESHOLD, MICRO_BATCH).astype(np.float32)
    uplink = Uplink(
        url,
        f"bench-{uuid.uuid4().hex[:6]}",
        UplinkSettings(timeout_s=10, attempt_timeout_s=10, max_attempts=1, breaker_failures=10**6),
    )
    uplink.start()
    done = [0] * IN_FLIGHT
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            uplink.request("digits-teacher", {"pixels": batch})
            done[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(IN_FLIGHT)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    uplink.close()
    return sum(done) / elapsed


def escalated_bridge(
    device: Broker, cloud: Broker, bodies: list[bytes], in_flight: int = IN_FLIGHT
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        config = write_cascade_config(
            data_dir / "bridge.toml",
            device=DEVICE,
            data_dir=data_dir,
            device_url=device.url,
            cloud_url=cloud.url,
            threshold=THRESHOLD,
            in_flight=in_flight,
            timeout_s=10.0,
            attempt_timeout_s=5.0,
        )
        return run_bridge(config, data_dir, device, bodies)


def stock_rows(args: argparse.Namespace) -> list[str]:
    """The stock-broker, every-reading-escalated comparison, as Markdown lines."""
    bodies = escalated_payloads(args.readings)
    rates: dict[str, list[float]] = {"worker": [], "bridge": [], "serial": [], "local": []}
    with tempfile.TemporaryDirectory() as tmp:
        device = Broker(Path(tmp) / "device", stock=True).start()
        cloud = Broker(Path(tmp) / "cloud", stock=True).start()
        worker = CloudWorkerProcess(cloud.url, ["digits-teacher"], Path(tmp) / "cloud.log")
        try:
            worker.start().wait_ready()
            for _ in range(args.runs):
                rates["worker"].append(cloud_worker_rate(cloud.url, args.seconds))
                rates["bridge"].append(escalated_bridge(device, cloud, bodies))
                rates["serial"].append(escalated_bridge(device, cloud, bodies, in_flight=1))
                rates["local"].append(through_bridge(device, bodies, 64, 5))
                print(
                    f"cloud worker {rates['worker'][-1]:,.0f} requests/s of {MICRO_BATCH} rows; "
                    f"bridge escalating {rates['bridge'][-1]:,.0f} readings/s "
                    f"({rates['serial'][-1]:,.0f} with one batch in flight), "
                    f"local only {rates['local'][-1]:,.0f}",
                    flush=True,
                )
        finally:
            worker.stop()
            device.stop()
            cloud.stop()
    worker_rates, bridge_rates = rates["worker"], rates["bridge"]
    worker_rps = statistics.median(worker_rates)
    bridge_rps = statistics.median(bridge_rates)
    return [
        f"Stock Mosquittos (device and cloud), every reading escalated ({args.readings:,} "
        f"readings the student is unsure of, `digits` cascade, {MICRO_BATCH}-reading "
        f"micro-batches, {IN_FLIGHT} in flight), median of {args.runs} runs",
        "",
        "| pipe | rate | bridge readings/s as a share |",
        "| --- | ---: | ---: |",
        f"| cloud worker alone: {MICRO_BATCH}-row requests, {IN_FLIGHT} in flight "
        f"| {worker_rps:,.0f} requests/s ({worker_rps * MICRO_BATCH:,.0f} rows/s) "
        f"| {bridge_rps / worker_rps:.0%} of its requests/s, "
        f"{bridge_rps / (worker_rps * MICRO_BATCH):.0%} of its rows/s |",
        f"| bridge, every reading escalated | {bridge_rps:,.0f} readings/s | |",
        f"| bridge, every reading escalated, one micro-batch in flight "
        f"| {statistics.median(rates['serial']):,.0f} readings/s | |",
        f"| bridge, local route only (nothing escalated), same stock broker "
        f"| {statistics.median(rates['local']):,.0f} readings/s | |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readings", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="cloud worker run length")
    parser.add_argument("--only-stock", action="store_true", help="only the escalated rows")
    args = parser.parse_args()
    if args.only_stock:
        write("\n".join(stock_rows(args)))
        return
    bodies = payloads(args.readings)
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp)).start()  # Tether's tuned configuration
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
    write("\n".join([*lines, "", *stock_rows(args)]))


def write(text: str) -> None:
    print(text)
    out = ROOT / "bench" / "results" / "sensors.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
