"""The bridge in-process against a real Mosquitto: formats, provenance, errors, back-pressure,
results waiting in the outbox while the broker is away, and the metrics endpoint."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge.sensors.bridge import SensorBridge, read_stats
from edge.sensors.processor import Answer
from edge.sensors.results import Outgoing, Reading
from edge.settings import load_settings
from harness.broker import Broker
from serving.settings import RuntimeSettings
from shared.mqtt import Message, MqttClient
from tests.conftest import REPOSITORY

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-student" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)

DEVICE = "bridge-test"
ROW = (np.arange(64) % 16).astype(np.float32)


def make_bridge(url: str, data_dir: Path, **sensors: Any) -> SensorBridge:
    settings = load_settings(
        None,
        device_id=DEVICE,
        data_dir=data_dir,
        mqtt_url=url,
        repository=REPOSITORY,
        models=["digits-student"],
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
        sensors={
            "bindings": [{"model": "digits-student"}],
            "metrics_port": 0,
            "client_id": f"bridge-{uuid.uuid4().hex[:6]}",
            **sensors,
        },
    )
    return SensorBridge(settings)


class Inbox:
    """Everything published under the device's sensor topics."""

    def __init__(self, url: str) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = MqttClient(url, f"inbox-{uuid.uuid4().hex[:6]}")
        self.client.subscribe(f"tether/{DEVICE}/sensors/+/inference", self._on)
        self.client.subscribe(f"tether/{DEVICE}/sensors/+/errors", self._on)
        self.client.start()

    def _on(self, message: Message) -> None:
        with self.lock:
            self.items.append((message.topic, json.loads(message.payload)))

    def wait(self, count: int, timeout_s: float = 10.0) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.items) >= count:
                    return list(self.items)
            time.sleep(0.02)
        raise AssertionError(f"got {len(self.items)} of {count} messages")


@pytest.fixture
def sensor(fresh_broker: Broker) -> Iterator[MqttClient]:
    client = MqttClient(fresh_broker.url, f"sensor-{uuid.uuid4().hex[:6]}")
    client.start()
    yield client
    client.stop()


def data_topic(name: str) -> str:
    return f"tether/{DEVICE}/sensors/{name}/data"


def test_formats_provenance_errors_and_metrics(
    fresh_broker: Broker, sensor: MqttClient, tmp_path: Path
) -> None:
    bridge = make_bridge(fresh_broker.url, tmp_path / "data", max_payload_bytes=64 * 1024)
    bridge.start(connect_wait_s=5)
    inbox = Inbox(fresh_broker.url)
    try:
        sensor.publish(
            data_topic("a"), json.dumps({"id": "j1", "ts": 5, "data": ROW.tolist()}).encode()
        )
        sensor.publish(data_topic("a"), b"{broken")
        sensor.publish(data_topic("b"), ROW.astype("<f4").tobytes(), correlation_data=b"raw-1")
        sensor.publish(data_topic("b"), b"\x01" * (100 * 1024), correlation_data=b"huge-1")
        sensor.publish(
            data_topic("c"), json.dumps([1.0] * 63).encode(), user_properties={"id": "short"}
        )
        nan = np.full(64, np.nan, dtype="<f4").tobytes()  # JSON cannot carry NaN; raw bytes can
        sensor.publish(data_topic("c"), nan, correlation_data=b"nan")
        sensor.publish(
            data_topic("c"), json.dumps(ROW.tolist()).encode(), user_properties={"seq": "s7"}
        )
        items = inbox.wait(7)
        by_id = {body["reading_id"]: (topic, body) for topic, body in items}
        topic, body = by_id["j1"]
        assert topic == f"tether/{DEVICE}/sensors/a/inference"
        assert body["sensor"] == "a" and body["timestamp"] == 5 and body["kind"] == "result"
        assert body["model_name"] == "digits-student" and body["model_version"] == "1"
        assert body["parameters"]["served_by"] == "edge" and body["parameters"]["route"] == "local"
        assert body["outputs"][0]["name"] == "probabilities" and body["outputs"][0]["shape"] == [
            1,
            10,
        ]
        assert by_id["raw-1"][0].endswith("/b/inference") and by_id["s7"][0].endswith(
            "/c/inference"
        )
        for rid, reason in [
            ("huge-1", "too_large"),
            ("short", "invalid_input"),
            ("nan", "invalid_input"),
        ]:
            topic, body = by_id[rid]
            assert topic.endswith("/errors") and body["reason"] == reason and body["error"]
        broken = [b for t, b in items if t.endswith("/a/errors")]
        assert broken and "malformed JSON" in broken[0]["error"]
        # the bridge carries on after the bad ones
        sensor.publish(data_topic("a"), json.dumps({"id": "after", "data": ROW.tolist()}).encode())
        assert any(b["reading_id"] == "after" for _, b in inbox.wait(8))
        # results count once the broker's PUBACK is processed, which can follow the delivery
        # the subscriber just saw: wait for the count rather than read it at once
        deadline = time.monotonic() + 10
        while (stats := bridge.stats())["results_out"] != {"result": 4, "error": 4}:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert stats["messages_in"] == 8
        assert stats["outbox"]["results"] == 0 and stats["drops"] == {}
        with urllib.request.urlopen(f"http://127.0.0.1:{bridge.metrics_port}/metrics") as resp:
            text = resp.read().decode()
        assert "tether_sensor_messages_total" in text and "tether_requests_total" in text
        assert "tether_sensor_outbox_depth" in text and "tether_sensor_queue_depth" in text
    finally:
        bridge.stop()
        inbox.client.stop()
    assert read_stats(tmp_path / "data")["messages_in"] == 8  # type: ignore[index]


def test_the_intake_absorbs_a_stalled_model_and_answers_in_order(
    fresh_broker: Broker, sensor: MqttClient, tmp_path: Path
) -> None:
    bridge = make_bridge(
        fresh_broker.url,
        tmp_path / "data",
        queue_size=8,
        batches_in_flight=3,
        batch={"max_messages": 4},
    )
    gate = threading.Event()
    answer = bridge.processor.answer

    def slow(batch: Sequence[Reading]) -> Answer:
        gate.wait(20)
        return answer(batch)

    bridge.processor.answer = slow  # type: ignore[method-assign]
    bridge.start(connect_wait_s=5)
    inbox = Inbox(fresh_broker.url)
    try:
        for i in range(300):
            sensor.publish(
                data_topic(f"p{i % 3}"),
                json.dumps({"id": f"p{i}", "seq": i, "data": ROW.tolist()}).encode(),
            )
        # Receive Maximum is 8, yet every reading is stored and acknowledged while the
        # model is stuck: the intake, not the broker, holds them
        deadline = time.monotonic() + 20
        while (bridge.intake.depth(), bridge.receiver.depth()) != (300, 0):
            assert time.monotonic() < deadline, (bridge.intake.depth(), bridge.receiver.depth())
            time.sleep(0.05)
        assert bridge.intake.depth() == 300 and bridge.receiver.depth() == 0
        assert bridge.stats()["messages_in"] == 300
        gate.set()
        items = inbox.wait(300, timeout_s=30)
        assert {b["reading_id"] for _, b in items} == {f"p{i}" for i in range(300)}
        for sensor_id in ("p0", "p1", "p2"):  # results leave in the order readings came
            seqs = [b["seq"] for t, b in items if t.endswith(f"/{sensor_id}/inference")]
            assert seqs == sorted(seqs) and len(seqs) == 100
        assert bridge.intake.depth() == 0
    finally:
        gate.set()
        bridge.stop()
        inbox.client.stop()


def test_results_wait_in_the_outbox_while_the_broker_is_down(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    bridge = make_bridge(fresh_broker.url, tmp_path / "data")
    bridge.start(connect_wait_s=5)
    try:
        fresh_broker.kill()
        time.sleep(0.3)
        bridge.outbox.store(
            [
                Outgoing(
                    "result",
                    f"tether/{DEVICE}/sensors/x/inference",
                    json.dumps({"kind": "result", "reading_id": f"w{i}"}).encode(),
                    f"w{i}",
                )
                for i in range(50)
            ]
        )
        assert bridge.stats()["outbox"]["results"] == 50
        fresh_broker.start()
        inbox = Inbox(fresh_broker.url)
        bridge.publisher.wake()
        deadline = time.monotonic() + 10
        while bridge.outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert bridge.outbox.depth() == 0
        # PUBACKed is not yet delivered: give the broker a moment to hand the last one over
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(
            b["reading_id"] == "w49" for _, b in list(inbox.items)
        ):
            time.sleep(0.05)
        # published in order once the link is back (the inbox joined before the first one)
        ids = [b["reading_id"] for _, b in inbox.items]
        assert ids == sorted(ids, key=lambda r: int(r[1:])) and ids[-1] == "w49"
        inbox.client.stop()
    finally:
        bridge.stop()
