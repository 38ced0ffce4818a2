"""Rollout orders through the real path: the shipped TLS + ACL broker, the real fleet agent.

Whoever can write ``tether/<device>/rollout`` (here: the ``fleet-controller`` identity,
standing for stolen controller credentials or a compromised broker) used to be able to
roll models back, abort installs, and, with an order for the model ``../outside`` and a
restart, make the agent delete a numeric folder outside its repository. Every order is now
signed for one device with a sequence number and an expiry: anything else is refused with
a reason, and the device's files stay exactly as they were.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.fleet_agent import UNVERIFIED_ORDER, FleetAgent
from edge.fleet_target import RepositoryTarget
from edge.settings import load_settings
from harness.onnx_models import dense_model
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions
from shared import topics
from shared.fleet import RolloutEvent, RolloutOrder
from shared.manifest import generate_key, key_id, public_key_text
from shared.mqtt import Message, MqttClient
from shared.order_signing import sign_order, signed_bytes
from tests.edge.fleet_support import next_seq, write_repository
from tests.security.secure_broker import SecureBroker

pytestmark = pytest.mark.usefixtures("trust_fleet_ca")

CPU = ("CPUExecutionProvider",)
#: Seconds to wait for one event from the agent (a loaded 2-core machine; usually ~0.1 s).
EVENT_WAIT_S = 20.0


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``root``: size, mtime and sha256 (folders: '')."""
    found: dict[str, tuple[int, int, str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns, digest)
    return found


def contents(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` with its sha256 (what is there, not when)."""
    return {name: digest for name, (_size, _mtime, digest) in snapshot(root).items()}


class Events:
    """The rollout events of every device, as the controller identity reads them."""

    def __init__(self, client: MqttClient) -> None:
        self.got: queue.Queue[tuple[str, RolloutEvent]] = queue.Queue()
        client.subscribe(topics.ROOT + "/+/rollout/events", self._on_event, qos=1)

    def _on_event(self, message: Message) -> None:
        self.got.put((topics_device(message.topic), RolloutEvent.parse(message.payload)))

    def next(self, device: str, *, rollout_id: str | None = None) -> RolloutEvent:
        """The next event of ``device`` (of ``rollout_id``, if given), skipping others."""
        deadline = time.monotonic() + EVENT_WAIT_S
        while True:
            try:
                source, event = self.got.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no event from {device} ({rollout_id})") from None
            if source == device and rollout_id in (None, event.rollout_id):
                return event


def topics_device(topic: str) -> str:
    return topic.split("/")[1]


class SecureDevice:
    """A device on the secure broker: its repository (``dense`` v1 and v2 on disk), the
    real fleet agent logged in as itself, and a numeric folder just outside the repository
    that nothing may ever touch."""

    def __init__(self, root: Path, broker: SecureBroker, name: str, fleet_key: str) -> None:
        self.root = root
        self.name = name
        repository = write_repository(root / "repository", {1: dense_model(seed=1)})
        write_repository(repository, {2: dense_model(seed=2)})
        self.sentinel = root / "outside" / "7"
        self.sentinel.mkdir(parents=True)
        (self.sentinel / "precious.txt").write_text("must survive")
        self.settings = load_settings(
            None,
            device_id=name,
            data_dir=root / "data",
            repository=repository,
            mqtt_url=broker.url(name),
            runtime={"backend": "onnxruntime", "providers": list(CPU)},
            fleet={"trusted_keys": [fleet_key], "status_interval_s": 60.0},
        )
        self.repository = ModelRepository(
            repository, RuntimeOptions(providers=CPU), backend="onnxruntime"
        )
        self.repository.load("dense", versions=[2])
        self.agent = self.new_agent()

    def new_agent(self) -> FleetAgent:
        return FleetAgent(self.settings, RepositoryTarget(self.repository))

    def restart(self) -> None:
        self.agent.stop()
        self.agent = self.new_agent()
        self.agent.start()


@pytest.fixture(scope="module")
def fleet_key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture
def controller(secure_broker: SecureBroker) -> Iterator[MqttClient]:
    """A connection as ``fleet-controller``: the only identity the ACL lets write orders."""
    client = MqttClient(secure_broker.url("fleet-controller"), f"tether-ctl-{uuid.uuid4().hex}")
    client.start(wait_s=10)
    yield client
    for device in ("dev-a", "dev-b"):
        client.publish(topics.device_rollout(device), b"", retain=True).wait_for_publish(5)
    client.stop()


@pytest.fixture
def device(
    tmp_path: Path, secure_broker: SecureBroker, fleet_key: Ed25519PrivateKey
) -> Iterator[SecureDevice]:
    instance = SecureDevice(tmp_path / "dev-a", secure_broker, "dev-a", public_key_text(fleet_key))
    instance.agent.start()
    yield instance
    instance.agent.stop()
    secure_broker.clear_retained("dev-a", topics.device_status("dev-a"))


def order(action: str = "rollback", model: str = "dense", **fields: Any) -> RolloutOrder:
    return RolloutOrder(
        rollout_id=fields.pop("rollout_id", f"r-{uuid.uuid4().hex[:8]}"),
        action=action,  # type: ignore[arg-type]
        model=model,
        issued_at=time.time(),
        **fields,
    )


def signed(
    key: Ed25519PrivateKey, device: str, body: RolloutOrder, *, expires_in_s: float = 600
) -> bytes:
    bound = body.model_copy(
        update={"device": device, "seq": next_seq(), "expires_at": time.time() + expires_in_s}
    )
    return sign_order(bound, key)


def sign_raw(key: Ed25519PrivateKey, body: dict[str, Any]) -> bytes:
    """Sign any JSON object as the controller would, bypassing the schema (a stolen key)."""
    signature = base64.b64encode(key.sign(signed_bytes(body))).decode()
    return orjson.dumps({**body, "signature": signature, "key_id": key_id(key)})


def send(controller: MqttClient, device: str, payload: bytes) -> None:
    controller.publish(topics.device_rollout(device), payload, retain=True).wait_for_publish(5)


def forged_orders(fleet_key: Ed25519PrivateKey) -> dict[str, tuple[bytes, str]]:
    """case -> (payload for dev-a, what the refusal must say)."""
    escape = {
        "schema_version": "1.1",
        "kind": "rollout_order",
        "rollout_id": "r-escape",
        "action": "abort",
        "model": "../outside",
        "issued_at": time.time(),
        "device": "dev-a",
        "seq": next_seq(),
        "expires_at": time.time() + 600,
    }
    genuine = signed(fleet_key, "dev-a", order(rollback_to=1))
    tampered = json.loads(genuine)
    tampered["rollback_to"] = 2
    return {
        # the attack as reported: an abort for a path, no signature at all
        "unsigned": (
            orjson.dumps({k: v for k, v in escape.items() if k not in ("device", "seq")}),
            "unsigned order",
        ),
        "absolute path, unsigned": (
            orjson.dumps({**escape, "model": str(Path("/").resolve() / "tmp")}),
            "unsigned order",
        ),
        "another key": (signed(generate_key(), "dev-a", order(rollback_to=1)), "untrusted key"),
        "tampered": (orjson.dumps(tampered), "signature does not verify"),
        "for another device": (
            signed(fleet_key, "dev-b", order(rollback_to=1)),
            "order is for device 'dev-b'",
        ),
        "expired": (
            signed(fleet_key, "dev-a", order(rollback_to=1), expires_in_s=-1),
            "order expired",
        ),
        # even the fleet key cannot make a path out of a model name
        "signed path": (sign_raw(fleet_key, escape), "model"),
        "not JSON": (b"\xff" * 64, "not JSON"),
    }


def test_forged_orders_are_refused_and_touch_no_file(
    device: SecureDevice,
    controller: MqttClient,
    fleet_key: Ed25519PrivateKey,
    secure_broker: SecureBroker,
) -> None:
    events = Events(controller)
    before = snapshot(device.root)
    for case, (payload, reason) in forged_orders(fleet_key).items():
        send(controller, "dev-a", payload)
        refused = events.next("dev-a")
        assert (refused.step, refused.rollout_id) == ("refused", UNVERIFIED_ORDER), case
        assert reason in refused.reason, (case, refused.reason)
        assert snapshot(device.root) == before, f"{case}: the device's files changed"
    # The reported attack restarted the agent between its orders: still nothing happens.
    device.restart()
    refused = events.next("dev-a")  # the retained forged order, refused again
    assert refused.step == "refused"
    assert snapshot(device.root) == before
    assert (device.sentinel / "precious.txt").read_text() == "must survive"
    assert sorted(device.repository.served()["dense"]) == ["2"]
    # A genuine order still works: the fleet key, for this device, now.
    rollback = order(rollback_to=1)
    send(controller, "dev-a", signed(fleet_key, "dev-a", rollback))
    done = events.next("dev-a", rollout_id=rollback.rollout_id)
    assert done.step == "rolled_back", done.reason


def test_replayed_orders_are_refused(
    device: SecureDevice,
    controller: MqttClient,
    fleet_key: Ed25519PrivateKey,
) -> None:
    events = Events(controller)
    first, second = order(model="dense", rollback_to=1), order(model="dense", rollback_to=1)
    old = signed(fleet_key, "dev-a", first)
    new = signed(fleet_key, "dev-a", second)
    send(controller, "dev-a", old)
    assert events.next("dev-a", rollout_id=first.rollout_id).step == "rolled_back"
    send(controller, "dev-a", new)
    assert events.next("dev-a", rollout_id=second.rollout_id).step == "rolled_back"
    before = snapshot(device.root)
    send(controller, "dev-a", old)  # captured earlier, sent again
    refused = events.next("dev-a")
    assert refused.step == "refused" and "replayed order" in refused.reason
    assert snapshot(device.root) == before
    # The order accepted last comes back on every reconnect (it is retained): that is the
    # same order again, not a replay. The agent only repeats its final event (once a run).
    send(controller, "dev-a", new)
    again = events.next("dev-a")  # from the running agent
    assert (again.step, again.rollout_id) == ("rolled_back", second.rollout_id)
    device.restart()
    again = events.next("dev-a")  # after the restart, from the retained copy
    assert (again.step, again.rollout_id) == ("rolled_back", second.rollout_id)
    # (Recovery at the restart rewrites the agent's state file; the models are untouched.)
    state = "data/fleet/state.json"
    assert {k: v for k, v in contents(device.root).items() if k != state} == {
        k: v[2] for k, v in before.items() if k != state
    }
    assert device.agent.state.order_seq == json.loads(new)["seq"]
