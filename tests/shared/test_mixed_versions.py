"""Edge and cloud of different minor versions talk, both ways, on a real broker.

The older side is the real 1.0 release: its code is taken from git (``LEGACY_COMMIT``, the
last commit with every schema at 1.0) and run in processes of its own
(``tests/shared/legacy_roles.py``). The stored fixtures under ``fixtures/v1.0/`` are
messages that release really sent (``tests/shared/capture_messages.py``); they go through
today's decoders and, over MQTT, today's cloud worker and rollout controller.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.uplink import Uplink
from harness.broker import Broker
from harness.fleet import FleetHarness, make_version, open_db, policy, wait_for
from serving.settings import RuntimeSettings
from shared import topics
from shared.codec import decode_request_parts, decode_response_parts
from shared.envelopes import (
    ENVELOPE_SCHEMA,
    ErrorEnvelope,
    InferRequestEnvelope,
    InferResponseEnvelope,
    decode_envelope,
    frame,
    unframe,
)
from shared.errors import SignatureError
from shared.fleet import DeviceStatus, RolloutEvent, RolloutOrder
from shared.manifest import (
    DeltaArtifact,
    Manifest,
    SignedManifest,
    canonical_json,
    generate_key,
    key_id,
    load_public_key,
    public_key_text,
    sign_manifest,
    verify_manifest,
)
from shared.mqtt import Message, MqttClient
from shared.protocol import ErrorResponse, InferenceResponse
from tests.conftest import REPOSITORY

ROOT = Path(__file__).resolve().parents[2]
#: The last commit at which every schema was 1.0: the "old release" these tests run.
LEGACY_COMMIT = "6b6353e618f9f0e80166caaf1a3b9aead572a844"
FIXTURES_1_0 = Path(__file__).parent / "fixtures" / "v1.0"
ROLES = Path(__file__).parent / "legacy_roles.py"
ROW = (np.arange(64) % 16).astype(np.float32).reshape(1, 64)
CPU = RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"])
#: A process of the old release imports onnxruntime and loads a model first: generous on a
#: loaded 2-core machine, and only ever waited out when something is broken.
START_S = 120.0

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-teacher" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)


# ---------------------------------------------------------------------------- the old release


@pytest.fixture(scope="module")
def legacy_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1.0 release's packages, extracted from this clone's git history."""
    root = tmp_path_factory.mktemp("tether-1.0")
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", LEGACY_COMMIT, "shared", "edge", "cloud", "tests"],
            capture_output=True,
            check=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(
            f"the 1.0 release (commit {LEGACY_COMMIT[:12]}) must be in this clone's git "
            f"history for the mixed-version tests (a full clone, not a shallow one): {exc}"
        )
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    return root


class Legacy:
    """One role of the old release in its own process (see ``legacy_roles.py``)."""

    def __init__(self, tree: Path, role: str, *args: str) -> None:
        self.log = tree / f"{role}-{uuid.uuid4().hex[:6]}.log"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, str(ROLES), role, *args],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("wb"),
            text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def wait(self, event: str, timeout_s: float = START_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.process.poll() is not None and self.lines.empty():
                    break
                continue
            if line.get("event") == event:
                return line
        raise AssertionError(f"old release: no {event!r}; its log:\n{self.log.read_text()[-3000:]}")

    def send(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()

    def stop(self) -> None:
        self.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def mixed_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of this module's own: old workers must not join other tests' share group."""
    instance = Broker(tmp_path_factory.mktemp("mixed-mosquitto")).start()
    yield instance
    instance.stop()


def cloud_worker(broker: Broker, worker_id: str) -> CloudWorker:
    worker = CloudWorker(
        CloudSettings(
            mqtt_url=broker.url,
            worker_id=worker_id,
            repository=REPOSITORY,
            models=["digits-teacher"],
            metrics_port=0,
            drain_timeout_s=1.0,
            runtime=CPU,
        )
    )
    worker.start()
    return worker


def fixture(name: str) -> bytes:
    """A stored 1.0 message as it went over the wire (JSON compact again)."""
    data = (FIXTURES_1_0 / name).read_bytes()
    return orjson.dumps(orjson.loads(data)) if name.endswith(".json") else data


# ---------------------------------------------------------------------------- inference


def test_an_edge_at_1_0_gets_answers_from_a_cloud_at_1_1(
    mixed_broker: Broker, legacy_tree: Path
) -> None:
    worker = cloud_worker(mixed_broker, "worker-1-1")
    edge = Legacy(legacy_tree, "uplink", mixed_broker.url, "edge-1-0")
    try:
        reply = edge.wait("reply")
    finally:
        edge.stop()
        worker.stop(drain=False)
    assert reply["schema"]["envelope"] == "1.0" and str(ENVELOPE_SCHEMA) == "1.1"
    assert reply["worker"] == "worker-1-1" and reply["model"] == "digits-teacher"
    assert abs(reply["sum"] - 1.0) < 1e-3


def test_an_edge_at_1_1_gets_answers_from_a_cloud_at_1_0(
    mixed_broker: Broker, legacy_tree: Path
) -> None:
    cloud = Legacy(legacy_tree, "worker", mixed_broker.url, str(REPOSITORY), "worker-1-0")
    uplink = Uplink(mixed_broker.url, "edge-1-1")
    try:
        assert cloud.wait("ready")["schema"]["envelope"] == "1.0"
        uplink.start()
        reply = uplink.request("digits-teacher", {"pixels": ROW}, timeout_s=60)
    finally:
        uplink.close()
        cloud.stop()
    assert reply.worker == "worker-1-0" and reply.model_name == "digits-teacher"
    assert reply.outputs["probabilities"].shape == (1, 10)
    assert abs(float(reply.outputs["probabilities"].sum()) - 1.0) < 1e-3


def test_stored_1_0_inference_messages_through_todays_decoders_and_worker(
    mixed_broker: Broker,
) -> None:
    envelope, tail = decode_envelope(fixture("infer_request.bin"))
    assert isinstance(envelope, InferRequestEnvelope) and envelope.agent_version is None
    assert decode_request_parts(envelope.request, tail).inputs["pixels"].shape == (1, 64)
    response, tail = decode_envelope(fixture("infer_response.json"))
    assert isinstance(response, InferResponseEnvelope) and response.worker_version is None
    assert decode_response_parts(response.response, tail)["outputs"][0]["name"] == "probabilities"
    error, _ = decode_envelope(fixture("error.json"))
    assert isinstance(error, ErrorEnvelope) and error.status == 404
    result = InferenceResponse.parse(fixture("sensor_result.json"))
    assert result.model_name == "digits-student" and result.outputs[0].shape == [1, 10]
    assert "malformed JSON" in ErrorResponse.parse(fixture("sensor_error.json")).error

    # The stored request, as a 1.0 edge sent it, answered by today's worker over MQTT.
    worker = cloud_worker(mixed_broker, "worker-fixtures")
    replies: queue.Queue[Message] = queue.Queue()
    client = MqttClient(mixed_broker.url, f"edge-fixture-{uuid.uuid4().hex[:6]}")
    reply_topic = topics.cloud_replies("edge-fixture", "c1")
    client.subscribe(reply_topic, replies.put, qos=1)
    client.start()
    try:
        header, tail = unframe(fixture("infer_request.bin"))
        header["deadline"] = time.time() + 60  # the stored one has passed; the value only
        payload = frame(header, [bytes(tail)])
        client.publish(
            topics.cloud_request("edge-fixture", "digits-teacher"),
            payload,
            qos=1,
            response_topic=reply_topic,
            correlation_data=b"fixture",
        )
        answer = replies.get(timeout=60)
    finally:
        client.stop()
        worker.stop(drain=False)
    envelope, tail = decode_envelope(answer.payload)
    assert isinstance(envelope, InferResponseEnvelope) and envelope.schema_version == "1.1"
    assert envelope.request_id == header["request_id"] and envelope.worker_version
    outputs = decode_response_parts(envelope.response, tail)["outputs"]
    assert outputs[0]["data"].shape == (1, 10)


# ---------------------------------------------------------------------------- fleet


def test_stored_1_0_fleet_messages_are_read_and_their_manifests_verify() -> None:
    key = load_public_key((FIXTURES_1_0 / "fleet-public-key.txt").read_text())
    order = RolloutOrder.parse(fixture("rollout_order_install.json"))
    assert order.signed_manifest is not None and order.wave is None
    assert order.signed_manifest.content_signature is None
    manifest = verify_manifest(
        order.signed_manifest, [key], now=time.time(), last_trusted_version=1
    )
    assert manifest.model == "dense" and manifest.version == 2 and manifest.deltas is None
    rollback = RolloutOrder.parse(fixture("rollout_order_rollback.json"))
    assert rollback.action == "rollback" and rollback.rollback_to == 2
    status = DeviceStatus.parse(fixture("device_status.json"))
    assert status.models["dense"].active == 2 and status.models["dense"].rollout_id is None
    assert not DeviceStatus.parse(fixture("device_status_will.json")).online
    committed = RolloutEvent.parse(fixture("rollout_event_committed.json"))
    assert committed.step == "committed" and committed.bytes_downloaded is None


def test_a_1_0_manifest_gains_nothing_unsigned() -> None:
    """Fields a 1.0 registry did not sign (``deltas``) are dropped, not trusted."""
    key = load_public_key((FIXTURES_1_0 / "fleet-public-key.txt").read_text())
    order = orjson.loads(fixture("rollout_order_install.json"))
    order["signed_manifest"]["manifest"]["deltas"] = [
        {
            "from_version": 1,
            "from_sha256": "0" * 64,
            "sha256": "1" * 64,
            "size": 1,
            "url": "http://attacker.invalid/delta",
        }
    ]
    signed = SignedManifest.parse(order["signed_manifest"])
    manifest = verify_manifest(signed, [key], now=time.time(), last_trusted_version=1)
    assert manifest.deltas is None


def test_a_manifest_from_a_newer_minor_verifies_with_every_field_signed() -> None:
    """A 1.1 reader verifies what a (future) 1.2 registry signed, fields it does not know
    included, and refuses it when one of those fields is changed."""
    key = generate_key()
    base = Manifest(
        model="digits",
        version=5,
        sha256="ab" * 32,
        size=10,
        url="http://127.0.0.1/artifacts/x",
        created_at=1_700_000_000.0,
        expires_at=4_000_000_000.0,
    )
    signed = sign_manifest(base, key).dump()
    content = {**signed["manifest"], "schema_version": "1.2", "signed_by_region": "eu-1"}
    signed["manifest"] = content
    signed["content_signature"] = base64.b64encode(key.sign(canonical_json(content))).decode()
    wire = orjson.dumps({"schema_version": "1.2", **signed})
    received = SignedManifest.parse(wire)
    assert verify_manifest(
        received, [key.public_key()], now=1_800_000_000.0, last_trusted_version=4
    )
    assert orjson.loads(orjson.dumps(received.dump()))["manifest"]["signed_by_region"] == "eu-1"
    tampered = orjson.loads(wire)
    tampered["manifest"]["signed_by_region"] = "elsewhere"
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(
            SignedManifest.parse(tampered),
            [key.public_key()],
            now=1_800_000_000.0,
            last_trusted_version=4,
        )
    assert key_id(key) == received.key_id


def test_stored_1_0_reports_reach_a_1_1_controller(tmp_path: Path, mixed_broker: Broker) -> None:
    db = open_db("sqlite", tmp_path)
    harness = FleetHarness(mixed_broker.url, db, tmp_path)
    device = f"fixture-{harness.run}"
    client = MqttClient(mixed_broker.url, f"old-device-{harness.run}")
    client.start()
    try:
        client.publish(topics.device_status(device), fixture("device_status.json"), qos=1)
        client.publish(
            topics.device_rollout_events(device), fixture("rollout_event_committed.json"), qos=1
        )
        wait_for(lambda: db.get_device(device) is not None, 20, "the 1.0 status")
        record = db.get_device(device)
        assert record is not None and record.active_version("dense") == 2
        assert record.labels == {"site": "fixtures"}
    finally:
        client.stop()
        harness.close()
        db.drop_schema()
        db.close()


def test_devices_at_1_0_follow_a_controller_at_1_1(
    tmp_path: Path, mixed_broker: Broker, legacy_tree: Path
) -> None:
    """Today's controller and registry (1.1 orders, manifests with deltas and content
    signatures) roll a version out to devices running the 1.0 release. Their health
    reports carry a baseline agreement but not how many samples it rests on (schema 1.2
    added that): that is no baseline evidence, so with the agreement gate on, the canary's
    wave fails naming the baseline; an operator who accepts it says so
    (``min_baseline_samples=0``)."""
    db = open_db("sqlite", tmp_path)
    harness = FleetHarness(mixed_broker.url, db, tmp_path)
    devices = Legacy(
        legacy_tree, "devices", mixed_broker.url, public_key_text(harness.key), harness.run, "3"
    )
    try:
        ready = devices.wait("ready")
        assert ready["schema"] == {"envelope": "1.0", "fleet": "1.0", "manifest": "1.0"}
        names = ready["devices"]
        wait_for(lambda: set(names) <= {d.device for d in db.list_devices()}, 30, "1.0 statuses")
        folder = make_version(tmp_path / "repo", "digits", 2)
        signed = harness.registry.publish(folder, harness.key)
        with_delta = signed.manifest.model_copy(
            update={
                "deltas": [
                    DeltaArtifact(
                        from_version=1,
                        from_sha256="0" * 64,
                        sha256="1" * 64,
                        size=100,
                        url=signed.manifest.url + ".from-1",
                    )
                ]
            }
        )
        for version in (3, 4):
            db.put_manifest(
                sign_manifest(with_delta.model_copy(update={"version": version}), harness.key)
            )
        from cloud.rollout import start_rollout

        gated, _ = start_rollout(db, "digits", 3, {"run": harness.run}, policy(waves=["1", "100%"]))
        assert harness.wait_state(gated.id, {"completed", "rolled_back"}, 90) == "rolled_back"
        reason = db.rollout(gated.id).reason
        assert "no evidence: 0 baseline shadow samples" in reason, reason
        rollout, _ = start_rollout(
            db,
            "digits",
            4,
            {"run": harness.run},
            policy(waves=["1", "100%"], min_baseline_samples=0),
        )
        assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 90) == "completed"
        devices.close()
        final = devices.wait("final")
    finally:
        devices.stop()
        harness.close()
        db.drop_schema()
        db.close()
    assert final["models"] == {name: {"digits": 4} for name in names}


def test_devices_of_today_report_to_a_controller_at_1_0_and_refuse_its_unsigned_orders(
    tmp_path: Path, mixed_broker: Broker, legacy_tree: Path
) -> None:
    """The 1.0 release's controller reads today's statuses (it starts a rollout to them and
    waits on their events), but today's devices refuse its orders: 1.0 orders are unsigned,
    and since order schema 1.2 a device acts only on signed ones (a security rule, not a
    schema one). Upgrade the controller before the devices."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.fleet_sim import SimDevice

    run = uuid.uuid4().hex[:6]
    folder = make_version(tmp_path / "repo", "digits", 2)
    controller = Legacy(
        legacy_tree,
        "controller",
        mixed_broker.url,
        f"sqlite:///{tmp_path}/legacy-fleet.db",
        str(folder),
        run,
        "3",
    )
    executor = ThreadPoolExecutor(max_workers=8)
    fleet: list[SimDevice] = []
    try:
        ready = controller.wait("ready")
        assert ready["schema"] == {"envelope": "1.0", "fleet": "1.0", "manifest": "1.0"}
        fleet = [
            SimDevice(
                name=f"today-{run}-{i}",
                broker_url=mixed_broker.url,
                trusted_keys=[load_public_key(ready["public_key"])],
                executor=executor,
                labels={"run": run},
                models={"digits": 1},
            )
            for i in range(3)
        ]
        for device in fleet:
            device.start()
            device.announce()
        controller.send("go")
        final = controller.wait("final")
    finally:
        controller.stop()
        for device in fleet:
            device.stop()
        executor.shutdown(wait=False)
    assert final["state"] == "rolled_back", final  # its canary never answered
    assert all(device.models == {"digits": 1} for device in fleet)
    refusals = [why for device in fleet for why in device.gate.refused]
    assert refusals and all("unsigned order" in why for why in refusals)
