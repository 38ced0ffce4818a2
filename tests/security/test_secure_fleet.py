"""Tether itself over the secure broker: the hybrid round trip and rollout messages work for
provisioned identities, and the cloud worker trusts the topic's device, never the payload.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from flask import Flask

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.agent import EdgeAgent
from edge.settings import MqttTlsSettings, load_settings
from edge.worker import build_app
from harness.onnx_models import dense_model, write_model
from serving.settings import RuntimeSettings
from shared import topics
from shared.codec import build_request
from shared.envelopes import InferRequestEnvelope, decode_envelope, frame
from shared.errors import TetherError
from shared.fleet import EVENTS_FILTER, RolloutEvent, RolloutOrder
from shared.manifest import generate_key, public_key_text
from shared.mqtt import Message, MqttClient, TlsConfig
from shared.order_signing import sign_order
from shared.protocol import InferenceRequest
from tests.edge.fleet_support import next_seq
from tests.security.secure_broker import Pki, SecureBroker

CPU = ["CPUExecutionProvider"]

pytestmark = pytest.mark.usefixtures("trust_fleet_ca")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secure-repository")
    write_model(root, "dense", dense_model(4, 3, seed=1))
    return root


@pytest.fixture
def worker(
    secure_broker: SecureBroker, repository: Path, trust_fleet_ca: Path
) -> Iterator[CloudWorker]:
    settings = CloudSettings(
        mqtt_url=secure_broker.url("cloud-worker"),
        worker_id=f"tether-cw-{uuid.uuid4().hex[:6]}",
        repository=repository,
        models=["dense"],
        share_group=f"sec-{uuid.uuid4().hex[:6]}",
        metrics_port=0,
        drain_timeout_s=2.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
    )
    instance = CloudWorker(settings)
    instance.start()
    yield instance
    instance.stop(drain=False, timeout_s=2.0)


def client(broker: SecureBroker, identity: str, tls: TlsConfig | None = None) -> MqttClient:
    mqtt = MqttClient(broker.url(identity), f"tether-{identity}-{uuid.uuid4().hex[:6]}", tls=tls)
    mqtt.start(wait_s=5.0)
    return mqtt


@pytest.fixture(scope="module", autouse=True)
def no_retained_leftovers(secure_broker: SecureBroker, pki: Pki) -> Iterator[None]:
    """Clear the retained statuses and orders this module's fleets leave on the session's
    broker, so later tests that subscribe to ``#`` see only their own messages."""
    yield
    tls = TlsConfig(ca_file=str(pki.ca_file))
    for identity, topic in (
        ("dev-a", topics.device_status("dev-a")),
        ("dev-b", topics.device_status("dev-b")),
        ("fleet-controller", topics.device_rollout("dev-a")),
        ("fleet-controller", topics.device_rollout("dev-b")),
    ):
        mqtt = client(secure_broker, identity, tls)
        try:
            mqtt.publish(topic, b"", retain=True).wait_for_publish(5)
        finally:
            mqtt.stop()


def collect(mqtt: MqttClient, topic_filter: str) -> queue.Queue[Message]:
    """Subscribe and wait until the broker granted it (its SUBACK came back)."""
    got: queue.Queue[Message] = queue.Queue()
    mqtt.subscribe(topic_filter, got.put, qos=1)
    assert mqtt.wait_subscribed(topic_filter, 10.0), f"the broker never granted {topic_filter}"
    return got


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    until = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < until, f"{what} within {timeout_s}s"
        time.sleep(0.02)


def test_hybrid_round_trip_for_a_provisioned_device(
    secure_broker: SecureBroker,
    pki: Pki,
    worker: CloudWorker,
    repository: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The device trusts the fleet CA through its own setting, not the process's trust store.
    monkeypatch.delenv("SSL_CERT_FILE")
    settings = load_settings(
        None,
        repository=repository,
        data_dir=tmp_path / "edge",
        device_id="dev-a",
        mqtt_url=secure_broker.url("dev-a"),
        routes={"dense": {"mode": "cloud"}},
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
        uplink={"timeout_s": 5.0},
        mqtt_tls=MqttTlsSettings(ca_file=pki.ca_file),  # the device's own CA setting
    )
    app: Flask = build_app(settings)
    agent = app.extensions["tether.agent"]
    assert isinstance(agent, EdgeAgent)
    try:
        x = np.random.default_rng(0).random((2, 4), dtype=np.float32)
        body = {
            "inputs": [
                {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.ravel().tolist()}
            ]
        }
        response = app.test_client().post("/v2/models/dense/infer", json=body)
        assert response.status_code == 200, response.get_json()
        data = response.get_json()
        assert data["parameters"]["served_by"] == "cloud"
        assert data["parameters"]["cloud_worker"] == worker.worker_id
    finally:
        agent.close()


def _request(device_field: str | None = None) -> tuple[str, bytes]:
    request_id = uuid.uuid4().hex
    header, blobs = build_request({"x": np.ones((1, 4), np.float32)}, request_id=request_id)
    envelope = InferRequestEnvelope(
        request_id=request_id,
        model="dense",
        deadline=time.time() + 10,
        request=InferenceRequest.model_validate(header),
    ).dump()
    if device_field is not None:
        envelope["device"] = device_field  # a field no reader trusts
    return request_id, frame(envelope, blobs)


def test_the_worker_trusts_the_topics_device_not_the_payloads(
    secure_broker: SecureBroker, worker: CloudWorker
) -> None:
    a, b = client(secure_broker, "dev-a"), client(secure_broker, "dev-b")
    try:
        a_replies = collect(a, topics.cloud_replies("dev-a", a.client_id))
        b_replies = collect(b, "tether/dev-b/cloud/replies/+")
        request_id, payload = _request(device_field="dev-b")
        a.publish(
            topics.cloud_request("dev-a", "dense"),
            payload,
            response_topic=topics.cloud_replies("dev-a", a.client_id),
            correlation_data=b"c1",
        ).wait_for_publish(5)
        reply = a_replies.get(timeout=5)
        envelope, _tail = decode_envelope(reply.payload)
        assert envelope.request_id == request_id and envelope.kind == "infer_response"
        # dev-a asks for the answer on dev-b's reply topic: the worker must not deliver it
        _, payload = _request()
        a.publish(
            topics.cloud_request("dev-a", "dense"),
            payload,
            response_topic=topics.cloud_replies("dev-b", b.client_id),
            correlation_data=b"c2",
        ).wait_for_publish(5)
        dropped = worker.metrics.failures.labels("unknown", "foreign_reply_topic")
        wait_until(lambda: dropped._value.get() == 1, 10.0, "the worker dropped the request")
        time.sleep(0.3)  # a reply, had one been sent at the drop, would be here by now
        assert b_replies.empty() and a_replies.empty()
    finally:
        a.stop()
        b.stop()


def test_a_device_publishing_from_many_threads_keeps_its_tls_connection(
    secure_broker: SecureBroker,
) -> None:
    """The uplink publishes from every request thread, the cloud worker from every worker
    thread. Over TLS only paho's network thread may touch the connection: when publishes
    wrote to the socket from the caller's thread (paho's single-threaded mode), two threads
    used one TLS session at once, the broker dropped the connection, and a test here saw
    "not connected" when it published."""
    a = client(secure_broker, "dev-a")
    lost: list[bool] = []
    a.add_connection_listener(lambda up: lost.append(up) if not up else None)
    got = collect(a, "tether/dev-a/sensors/+/data")
    errors: list[str] = []

    def publish(sensor: int) -> None:
        for _ in range(150):
            try:
                a.publish(f"tether/dev-a/sensors/race{sensor}/data", b"x" * 20_000)
            except TetherError as exc:
                errors.append(exc.message)
                return

    try:
        threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_until(lambda: got.qsize() == 600 or bool(lost), 30.0, "600 messages back")
        assert (lost, errors) == ([], []), secure_broker.log()
    finally:
        a.stop()


def test_a_rollout_reaches_its_device_and_its_events_reach_the_controller(
    secure_broker: SecureBroker,
) -> None:
    controller = client(secure_broker, "fleet-controller")
    a, b = client(secure_broker, "dev-a"), client(secure_broker, "dev-b")
    try:
        events = collect(controller, EVENTS_FILTER)
        orders_a = collect(a, topics.device_rollout("dev-a"))
        snooped = collect(b, topics.device_rollout("dev-a"))  # not b's to read
        order = RolloutOrder(
            rollout_id=f"r-{uuid.uuid4().hex[:6]}",
            action="rollback",
            model="dense",
            rollback_to=1,
            issued_at=time.time(),
            device="dev-a",
            seq=next_seq(),
            expires_at=time.time() + 60,
        )
        payload = sign_order(order, generate_key())
        controller.publish(topics.device_rollout("dev-a"), payload, retain=True).wait_for_publish(5)
        received = RolloutOrder.parse(orders_a.get(timeout=5).payload)
        assert received.rollout_id == order.rollout_id and received.signature
        event = RolloutEvent(
            rollout_id=order.rollout_id,
            device="dev-b",  # informational: the controller trusts the topic
            model="dense",
            version=1,
            step="rolled_back",
            at=time.time(),
        )
        a.publish(topics.device_rollout_events("dev-a"), frame(event.dump())).wait_for_publish(5)
        message = events.get(timeout=5)
        assert message.topic == "tether/dev-a/rollout/events"
        assert RolloutEvent.parse(message.payload).step == "rolled_back"
        # a device's forged order for another device never arrives
        b.publish(topics.device_rollout("dev-a"), payload).wait_for_publish(5)
        time.sleep(0.3)
        assert orders_a.empty() and snooped.empty()
        # clear the retained order
        controller.publish(topics.device_rollout("dev-a"), b"", retain=True).wait_for_publish(5)
    finally:
        for mqtt in (controller, a, b):
            mqtt.stop()


def test_a_full_rollout_works_for_provisioned_identities(
    secure_broker: SecureBroker, trust_fleet_ca: Path, tmp_path: Path
) -> None:
    """The real controller (as ``fleet-controller``) rolls a signed version out to the real
    fleet agent (as ``dev-a``), over TLS, both confined by the shipped ACL."""
    from cloud.fleet_db import FleetDB
    from tests.integration.fleet_e2e import E2EDevice, E2EFleet, policy, student, wait_for

    db = FleetDB(f"sqlite:///{tmp_path / 'fleet.db'}")
    teacher = lambda model, inputs: {}  # noqa: E731 - no shadow traffic in this test
    fleet = E2EFleet(
        secure_broker.url("fleet-controller"), db, tmp_path, teacher, np.zeros((1, 64), np.float32)
    )
    device = E2EDevice(
        "dev-a",
        tmp_path / "devices" / "dev-a",
        secure_broker.url("dev-a"),
        [public_key_text(fleet.key)],
        {"run": fleet.run},
        teacher,
    )
    try:
        fleet.devices.append(device)
        device.start()

        def selectable() -> bool:
            record = db.get_device("dev-a")
            return record is not None and record.online and record.matches({"run": fleet.run})

        # A device is selectable once an online status with its labels is in.
        wait_for(selectable, 15, "dev-a's status with its labels")
        fleet.publish(student(), 2)
        rollout = fleet.start(
            2, policy(waves=["100%"], window_s=0.3, shadow_sample_rate=0.0), run=fleet.run
        )
        assert fleet.wait_final(rollout, timeout_s=30) == "completed"
        assert device.served() == [2]
        # It acted on signed orders only: the last one it accepted is recorded.
        assert device.agent.state.order_seq is not None
    finally:
        fleet.close()
