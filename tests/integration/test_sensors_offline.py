"""The sensor bridge keeps answering when the cloud is gone and loses nothing when killed.

Two real Mosquitto brokers (device and cloud), a real cloud worker on the cloud broker, and
``python -m edge.bridge_cli`` as a real process serving ``digits`` as a cascade of
``digits-student`` over ``digits-teacher`` with corrections on. A simulated population of
sensors publishes 10,000 QoS 1 readings (and a few malformed ones) while the cloud broker
is killed and later restarted, and while the bridge is killed with SIGKILL once and
restarted. Every reading must end with a result (or an error for the malformed ones) or a
counted, explained drop; copies are allowed only from the window between publishing a
result and recording that it was published, and are then byte-identical.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from harness.broker import Broker
from harness.sensor_stack import BridgeProcess, Collector, write_cascade_config
from models.digits import load_split
from serving.settings import RuntimeSettings
from shared.mqtt import MqttClient
from tests.conftest import REPOSITORY

DEVICE = "it-dev"
SENSORS = 50
READINGS = 10_000
MALFORMED = 20
THRESHOLD = 0.7
CPU = ["CPUExecutionProvider"]

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-teacher" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    device = Broker(tmp_path / "device-broker").start()
    cloud = Broker(tmp_path / "cloud-broker").start()
    yield device, cloud
    device.stop()
    cloud.stop()


@pytest.fixture
def cloud_worker(brokers: tuple[Broker, Broker]) -> Iterator[CloudWorker]:
    settings = CloudSettings(
        mqtt_url=brokers[1].url,
        worker_id=f"cw-{uuid.uuid4().hex[:6]}",
        repository=REPOSITORY,
        models=["digits-teacher"],
        metrics_port=0,
        drain_timeout_s=1.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
    )
    worker = CloudWorker(settings)
    worker.start()
    yield worker
    worker.stop(drain=False, timeout_s=2.0)


def reading_payload(
    index: int, sensor: int, seq: int, pixels: np.ndarray
) -> tuple[bytes, dict[str, Any]]:
    """A reading in one of three formats, chosen by ``index``; returns payload and publish kwargs."""
    reading_id = f"s{sensor:02d}-{seq:05d}"
    row = pixels[index % len(pixels)]
    fmt = index % 3
    if fmt == 0:
        body = {"id": reading_id, "seq": seq, "ts": time.time(), "data": row.tolist()}
        return json.dumps(body).encode(), {}
    if fmt == 1:
        v2 = {
            "id": reading_id,
            "parameters": {"timestamp": time.time()},
            "inputs": [
                {"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}
            ],
        }
        return json.dumps(v2).encode(), {}
    raw = row.astype("<f4").tobytes()
    return raw, {
        "correlation_data": reading_id.encode(),
        "content_type": "application/octet-stream",
    }


def malformed_payload(k: int) -> tuple[str, bytes]:
    """The ``k``-th malformed reading and its id: invalid JSON, wrong length, type, huge."""
    bad_id = f"bad-{k:03d}"
    kind = k % 4
    if kind == 0:
        return bad_id, b'{"id": "' + bad_id.encode() + b'", "data": [1, 2,'
    if kind == 1:
        return bad_id, json.dumps({"id": bad_id, "data": [1.0] * 63}).encode()
    if kind == 2:
        return bad_id, json.dumps({"id": bad_id, "data": ["a"] * 64}).encode()
    return bad_id, b"\x00" * (2 * 1024 * 1024)


def test_ten_thousand_readings_survive_cloud_outage_and_agent_crash(
    tmp_path: Path, brokers: tuple[Broker, Broker], cloud_worker: CloudWorker
) -> None:
    device, cloud = brokers
    data_dir = tmp_path / "bridge"
    config = write_cascade_config(
        tmp_path / "bridge.toml",
        device=DEVICE,
        data_dir=data_dir,
        device_url=device.url,
        cloud_url=cloud.url,
        threshold=THRESHOLD,
    )
    collector = Collector(device.url, DEVICE)
    collector.client.start()
    bridge = BridgeProcess(config, data_dir)
    bridge.start()
    bridge.wait_ready()

    pixels, _ = load_split("test")
    publisher = MqttClient(device.url, f"sensors-{uuid.uuid4().hex[:6]}", max_inflight=1000)
    publisher.start()
    expected: set[str] = set()
    bad_expected: dict[str, str] = {}
    infos = []
    events: list[str] = []
    started = time.monotonic()
    per_second = 1000.0
    for i in range(READINGS):
        sensor, seq = i % SENSORS, i // SENSORS
        payload, kwargs = reading_payload(i, sensor, seq, pixels)
        expected.add(f"s{sensor:02d}-{seq:05d}")
        infos.append(
            publisher.publish(
                f"tether/{DEVICE}/sensors/s{sensor:02d}/data", payload, qos=1, **kwargs
            )
        )
        if i % (READINGS // MALFORMED) == 7:
            bad_id, bad = malformed_payload(len(bad_expected))
            infos.append(
                publisher.publish(
                    f"tether/{DEVICE}/sensors/bad/data",
                    bad,
                    qos=1,
                    correlation_data=bad_id.encode(),
                )
            )
            bad_expected[bad_id] = bad[:20].decode("latin-1")
        if i == 1500:
            cloud.kill()
            events.append(f"{time.monotonic() - started:.1f}s cloud broker killed")
        elif i == 4000:
            bridge.kill()
            events.append(f"{time.monotonic() - started:.1f}s bridge SIGKILLed")
        elif i == 5000:
            bridge.start()
            events.append(f"{time.monotonic() - started:.1f}s bridge restarted")
        elif i == 7000:
            cloud.start()
            events.append(f"{time.monotonic() - started:.1f}s cloud broker restarted")
        ahead = (i + 1) / per_second - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    for info in infos:
        info.wait_for_publish(30)
    published_s = time.monotonic() - started

    def settled() -> bool:
        results = collector.ids("result")
        degraded = {
            rid
            for rid, bodies in collector.of("result").items()
            if bodies[0]["parameters"]["route"] == "degraded"
        }
        errors = collector.ids("error")
        return (
            expected <= results
            and degraded <= collector.ids("correction")
            and set(bad_expected) <= errors
        )

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not settled():
        time.sleep(0.25)
    done_s = time.monotonic() - started
    print(
        f"published in {published_s:.1f}s, settled={settled()} after {done_s:.1f}s; "
        f"results {len(collector.ids('result'))}, corrections {len(collector.ids('correction'))}, "
        f"errors {len(collector.ids('error'))}; {'; '.join(events)}"
    )
    stats = bridge.stats() or {}
    assert bridge.stop() == 0, bridge.log()
    collector.client.stop()
    publisher.stop()

    results = collector.of("result")
    corrections = collector.of("correction")
    errors = collector.of("error")
    with sqlite3.connect(data_dir / "sensors" / "outbox.sqlite3") as db:
        drops = db.execute("SELECT kind, reading_id, reason FROM drops").fetchall()
    dropped = {row[1] for row in drops}
    missing = expected - set(results) - dropped
    assert not missing, (
        f"{len(missing)} readings have neither a result nor a drop: {sorted(missing)[:10]}"
    )
    assert not drops, f"nothing should be dropped with the default outbox bounds: {drops[:5]}"

    # copies only from the publish/record window: byte-identical to the first publication
    copies = 0
    for key, payloads in collector.messages.items():
        copies += len(payloads) - 1
        assert all(p == payloads[0] for p in payloads), f"{key} was answered twice differently"

    degraded = {
        rid for rid, bodies in results.items() if bodies[0]["parameters"]["route"] == "degraded"
    }
    escalated = {
        rid for rid, bodies in results.items() if bodies[0]["parameters"]["route"] == "escalated"
    }
    local = {rid for rid, bodies in results.items() if bodies[0]["parameters"]["route"] == "local"}
    assert degraded, "the cloud outage must produce degraded answers"
    assert escalated, "with the cloud up, low-confidence readings must be escalated"
    assert degraded <= set(corrections)
    assert set(corrections) <= degraded
    for rid in degraded:
        body = results[rid][0]
        assert body["parameters"]["served_by"] == "edge" and body["parameters"]["cloud_error"]
        assert body["parameters"]["confidence"] < THRESHOLD
        fix = corrections[rid][0]
        assert (
            fix["parameters"]["served_by"] == "cloud" and fix["parameters"]["route"] == "escalated"
        )
        assert fix["parameters"]["model"] == "digits-teacher" and fix["kind"] == "correction"
        assert fix["sensor"] == body["sensor"] and fix["timestamp"] == body["timestamp"]
    for rid in list(local)[:200]:
        params = results[rid][0]["parameters"]
        assert params["served_by"] == "edge" and params["model"] == "digits-student"
        assert params["confidence"] >= THRESHOLD
    for rid in escalated:
        assert results[rid][0]["parameters"]["served_by"] == "cloud"
    sample = results["s00-00003"][0]  # index 150: the JSON object format
    assert sample["sensor"] == "s00" and sample["seq"] == 3 and sample["model_name"] == "digits"
    assert len(sample["outputs"][0]["data"]) == 10 and sample["model_version"]
    for bad_id in bad_expected:
        assert errors[bad_id][0]["error"] and errors[bad_id][0]["sensor"] == "bad"

    summary = (
        f"{READINGS} readings + {len(bad_expected)} malformed published in {published_s:.1f}s, "
        f"all answered after {done_s:.1f}s; local {len(local)}, escalated {len(escalated)}, "
        f"degraded {len(degraded)} (corrected {len(set(corrections) & degraded)}); "
        f"copies {copies}; drops {len(drops)}; redeliveries skipped "
        f"{stats.get('redeliveries_skipped')}; events: {'; '.join(events)}"
    )
    print(summary)
    (tmp_path / "summary.txt").write_text(summary)
