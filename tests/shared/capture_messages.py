"""Records the messages the running code really sends, as stored fixtures of a schema version.

``python -m tests.shared.capture_messages tests/shared/fixtures/v1.1`` starts a Mosquitto,
a cloud worker and an uplink, a sensor bridge, and a fleet (registry, artifact server,
rollout controller, one real fleet agent), lets them work, and writes every message kind
it saw off the broker into the folder: ``<kind>.json`` for JSON payloads, ``<kind>.bin``
for binary-framed envelopes, plus ``fleet-public-key.txt`` (the key the captured manifests
and orders were signed with; it is thrown away after the run) and ``index.json`` (kind ->
file, topic, schema version).

A fixture folder is written once, by the code of that version, and never edited: the
mixed-version tests (``tests/shared/test_mixed_versions.py``) feed these exact bytes to
today's readers. Capture a new folder when a schema version is bumped.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import PublishOptions, Registry
from cloud.rollout import RolloutController, request_abort, start_rollout
from cloud.rollout_policy import RolloutPolicy
from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.fleet.agent import FleetAgent
from edge.fleet.target import RepositoryTarget
from edge.sensors.bridge import SensorBridge
from edge.settings import load_settings
from edge.uplink import Uplink
from harness.broker import Broker
from harness.onnx_models import dense_model
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions
from serving.settings import RuntimeSettings
from shared.envelopes import unframe
from shared.errors import TetherError
from shared.manifest import generate_key, public_key_text
from shared.mqtt import Message, MqttClient
from tests.conftest import REPOSITORY
from tests.edge.fleet.support import write_repository

DEVICE = "fixture-device"
CPU = RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"])
ROW = (np.arange(64) % 16).astype(np.float32)
#: Manifests in the fixtures stay valid for a century, so tests can verify them for years.
CENTURY_S = 100 * 365 * 86400.0


class Recorder:
    """Every message under ``tether/#``, in arrival order."""

    def __init__(self, url: str) -> None:
        self.messages: list[Message] = []
        self.lock = threading.Lock()
        self.client = MqttClient(url, f"recorder-{uuid.uuid4().hex[:6]}")
        self.client.subscribe("tether/#", self._on, qos=1)
        self.client.start()

    def _on(self, message: Message) -> None:
        if message.payload:
            with self.lock:
                self.messages.append(message)

    def find(
        self,
        kind: str,
        timeout_s: float = 30.0,
        when: Callable[[dict[str, Any]], bool] = lambda header: True,
        **fields: Any,
    ) -> Message:
        """The first message whose JSON header has ``kind``, the given field values, and
        passes ``when``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for message in self.messages:
                    header = header_of(message.payload)
                    if (_plain_kind(message.topic) or header.get("kind")) != kind:
                        continue
                    if all(header.get(k) == v for k, v in fields.items()) and when(header):
                        return message
            time.sleep(0.05)
        raise AssertionError(f"no {kind} message with {fields} within {timeout_s}s")


def header_of(payload: bytes) -> dict[str, Any]:
    try:
        header, _ = unframe(payload)
    except TetherError:
        return {}
    return header


def _plain_kind(topic: str) -> str:
    """Sensor messages are named by their topic (their ``kind`` says result or correction)."""
    if topic.endswith("/inference"):
        return "sensor_result"
    if topic.endswith("/errors"):
        return "sensor_error"
    return ""


def capture_inference(broker: Broker, recorder: Recorder, found: dict[str, Message]) -> None:
    settings = CloudSettings(
        mqtt_url=broker.url,
        worker_id="fixture-worker",
        repository=REPOSITORY,
        models=["digits-teacher"],
        metrics_port=0,
        drain_timeout_s=1.0,
        runtime=CPU,
    )
    worker = CloudWorker(settings)
    worker.start()
    uplink = Uplink(broker.url, DEVICE)
    uplink.start()
    try:
        uplink.request("digits-teacher", {"pixels": ROW.reshape(1, 64)}, timeout_s=30)
        found["infer_request"] = recorder.find("infer_request", model="digits-teacher")
        found["infer_response"] = recorder.find("infer_response")
        with contextlib.suppress(TetherError):
            uplink.request("no-such-model", {"pixels": ROW.reshape(1, 64)}, timeout_s=30)
        found["error"] = recorder.find("error")
    finally:
        uplink.close()
        worker.stop(drain=False)


def capture_sensors(
    broker: Broker, recorder: Recorder, found: dict[str, Message], tmp: Path
) -> None:
    settings = load_settings(
        None,
        device_id=DEVICE,
        data_dir=tmp / "bridge",
        mqtt_url=broker.url,
        repository=REPOSITORY,
        models=["digits-student"],
        runtime=CPU,
        sensors={"bindings": [{"model": "digits-student"}], "metrics_port": 0},
    )
    bridge = SensorBridge(settings)
    bridge.start(connect_wait_s=10)
    sensor = MqttClient(broker.url, "fixture-sensor")
    sensor.start()
    try:
        topic = f"tether/{DEVICE}/sensors/s1/data"
        reading = {"id": "r-1", "ts": 1700000000.5, "data": ROW.tolist()}
        sensor.publish(topic, orjson.dumps(reading), qos=1)
        sensor.publish(topic, b"{not json", qos=1)
        found["sensor_result"] = recorder.find("sensor_result")
        found["sensor_error"] = recorder.find("sensor_error")
    finally:
        sensor.stop()
        bridge.stop()


def capture_fleet(broker: Broker, recorder: Recorder, found: dict[str, Message], tmp: Path) -> str:
    key = generate_key()
    db = FleetDB(f"sqlite:///{tmp}/fleet.db")
    store = ArtifactStore(tmp / "artifacts")
    server = ArtifactServer(store).start()
    registry = Registry(db, store, server.url)
    cloud = MqttClient(broker.url, "fixture-controller")
    cloud.start()
    controller = RolloutController(db, cloud, signing_key=key, tick_s=0.05)
    controller.start()
    repo = write_repository(tmp / "device" / "repository", {1: dense_model(seed=1)})
    settings = load_settings(
        None,
        device_id=DEVICE,
        data_dir=tmp / "device" / "data",
        mqtt_url=broker.url,
        repository=repo,
        runtime=CPU,
        fleet={
            "trusted_keys": [public_key_text(key)],
            "labels": {"site": "fixtures"},
            "status_interval_s": 1.0,
            "max_error_rate": 1.0,
            "min_requests": 0,
        },
    )
    repository = ModelRepository(
        repo, RuntimeOptions(providers=("CPUExecutionProvider",)), backend="onnxruntime"
    )
    repository.load("dense")
    agent = FleetAgent(settings, RepositoryTarget(repository))
    agent.start(connect_wait_s=10)
    published = write_repository(
        tmp / "published", {2: dense_model(seed=2), 3: dense_model(seed=3)}
    )
    options = PublishOptions(expires_s=CENTURY_S)
    try:
        registry.publish(published / "dense" / "2", key, options)
        quick = RolloutPolicy(waves=["100%"], window_s=0.3, device_timeout_s=30, min_requests=0)
        rollout, _ = start_rollout(db, "dense", 2, {"site": "fixtures"}, quick)
        found["rollout_order_install"] = recorder.find("rollout_order", action="install")
        found["rollout_event_received"] = recorder.find("rollout_event", step="received")
        found["rollout_event_committed"] = recorder.find("rollout_event", step="committed")
        found["device_status"] = recorder.find(
            "device_status",
            online=True,
            when=lambda status: status["models"].get("dense", {}).get("active") == 2,
        )
        deadline = time.monotonic() + 30
        while db.rollout(rollout.id).state != "completed" and time.monotonic() < deadline:
            time.sleep(0.05)
        registry.publish(published / "dense" / "3", key, options)
        slow = RolloutPolicy(waves=["100%"], window_s=600, device_timeout_s=30, min_requests=0)
        rollout, _ = start_rollout(db, "dense", 3, {"site": "fixtures"}, slow)
        recorder.find("rollout_event", step="active", rollout_id=rollout.id)
        request_abort(db, rollout.id)
        found["rollout_order_rollback"] = recorder.find("rollout_order", action="rollback")
        found["rollout_event_rolled_back"] = recorder.find("rollout_event", step="rolled_back")
        will = agent.reporter.will()
        found["device_status_will"] = Message(will.topic, will.payload, retain=True)
    finally:
        agent.stop()
        controller.stop()
        cloud.stop()
        server.stop()
        db.close()
    return public_key_text(key)


def write(folder: Path, found: dict[str, Message], public_key: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, dict[str, Any]] = {}
    for kind, message in sorted(found.items()):
        binary = message.payload[:1] != b"{"
        name = f"{kind}.{'bin' if binary else 'json'}"
        payload = message.payload
        if not binary:  # stored pretty for reading; the tests send the compact bytes
            payload = orjson.dumps(orjson.loads(payload), option=orjson.OPT_INDENT_2) + b"\n"
        (folder / name).write_bytes(payload)
        index[kind] = {
            "file": name,
            "topic": message.topic,
            "schema_version": header_of(message.payload).get("schema_version"),
        }
    (folder / "index.json").write_bytes(
        orjson.dumps(index, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"
    )
    (folder / "fleet-public-key.txt").write_text(public_key + "\n")


def main(folder: Path) -> None:
    found: dict[str, Message] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "broker").start()
        recorder = Recorder(broker.url)
        try:
            capture_inference(broker, recorder, found)
            capture_sensors(broker, recorder, found, tmp)
            public_key = capture_fleet(broker, recorder, found, tmp)
        finally:
            recorder.client.stop()
            broker.stop()
    write(folder, found, public_key)
    for kind in sorted(found):
        print(kind, found[kind].topic)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
