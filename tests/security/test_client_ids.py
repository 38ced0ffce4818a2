"""Sessions cannot be taken over: device A cannot connect with device B's client ids.

A client that connects with a client id in use takes that session over: the broker
disconnects the other client and publishes its last will (which marks a device offline
and keeps it out of new rollouts). On the shipped TLS + ACL broker, with the real fleet
agent: every id a client sends must start with ``tether-`` and no identity does, the
certificate listener binds a client's id to its certificate, and the ids Tether's clients
pick on the password listener end with a part only their device knows.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge.fleet_agent import FleetAgent
from edge.fleet_target import RepositoryTarget
from edge.sensors.bridge import client_id_of
from edge.settings import EdgeSettings, load_settings
from harness.onnx_models import dense_model
from serving.repository import ModelRepository
from shared import topics
from shared.manifest import generate_key, public_key_text
from shared.mqtt import Message, MqttClient
from tests.edge.fleet_support import write_repository
from tests.security.secure_broker import Probe, Refused, SecureBroker

pytestmark = pytest.mark.usefixtures("trust_fleet_ca")

#: A session the broker keeps for an hour while its client is away.
SESSION_S = 3600
#: Long enough for a takeover to show (the broker disconnects at once, ~ms); it only bounds
#: how long the "nothing happened" checks watch.
QUIET_S = 1.0


def device_settings(root: Path, broker: SecureBroker, name: str) -> EdgeSettings:
    repository = write_repository(root / "repository", {1: dense_model(seed=1)})
    return load_settings(
        None,
        device_id=name,
        data_dir=root / "data",
        repository=repository,
        mqtt_url=broker.url(name),
        runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        fleet={"trusted_keys": [public_key_text(generate_key())], "status_interval_s": 60.0},
    )


@pytest.fixture
def fleet_agent_b(tmp_path: Path, secure_broker: SecureBroker) -> Iterator[FleetAgent]:
    """dev-b's real fleet agent, logged in with its password."""
    settings = device_settings(tmp_path / "dev-b", secure_broker, "dev-b")
    agent = FleetAgent(settings, RepositoryTarget(ModelRepository(settings.repository)))
    agent.start(connect_wait_s=10)
    assert agent.client.connected
    yield agent
    agent.stop()
    secure_broker.clear_retained("dev-b", topics.device_status("dev-b"))


@pytest.fixture
def bridge_b(secure_broker: SecureBroker) -> Iterator[Probe]:
    """dev-b's Mosquitto bridge: its certificate, a persistent session, the id it sends as
    in deploy/mosquitto/bridge.conf."""
    probe = secure_broker.certificate_probe("dev-b", "tether-bridge-dev-b")
    probe.connect(clean_start=False, session_expiry_s=SESSION_S)
    assert probe.subscribe("tether/dev-b/cloud/replies/+") == 1  # granted QoS 1
    yield probe
    probe.close()


@pytest.fixture
def offline_wills(secure_broker: SecureBroker) -> Iterator[queue.Queue[Message]]:
    """dev-b's status messages, as the controller reads them (a takeover sends its will)."""
    got: queue.Queue[Message] = queue.Queue()
    controller = MqttClient(secure_broker.url("fleet-controller"), f"tether-t-{uuid.uuid4().hex}")
    controller.subscribe(topics.device_status("dev-b"), got.put, qos=1)
    controller.start(wait_s=10)
    yield got
    controller.stop()


def offline(statuses: queue.Queue[Message]) -> list[bytes]:
    found = []
    deadline = time.monotonic() + QUIET_S
    while True:
        try:
            message = statuses.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return found
        if b'"online":false' in message.payload.replace(b" ", b""):
            found.append(message.payload)


def test_device_a_cannot_connect_with_device_bs_ids(
    secure_broker: SecureBroker,
    fleet_agent_b: FleetAgent,
    bridge_b: Probe,
    offline_wills: queue.Queue[Message],
) -> None:
    fleet_id = fleet_agent_b.client.client_id
    assert fleet_id.startswith("tether-dev-b-fleet-") and len(fleet_id) > len("tether-dev-b-fleet-")
    # B's fleet id as it used to be, and B's certificate session id: refused outright.
    for stolen in ("dev-b-fleet", "dev-b"):
        probe = secure_broker.password_probe("dev-a", stolen)
        with pytest.raises(Refused, match="0x87"):
            probe.connect()
    # Guesses with the prefix connect, as themselves: none of them is one of B's sessions.
    for guess in ("tether-dev-b-fleet", "tether-bridge-dev-b", "tether-dev-b"):
        secure_broker.password_probe("dev-a", guess).connect().close()
    # On the certificate listener A's session is A's, whatever id it sends.
    a_bridge = secure_broker.certificate_probe("dev-a", "tether-bridge-dev-b")
    a_bridge.connect()
    a_bridge.close()
    # B stayed connected all along, and no offline will went out for it.
    assert offline(offline_wills) == []
    assert fleet_agent_b.client.connected
    assert bridge_b.connected, f"B's bridge was disconnected: {bridge_b.disconnects.get()}"
    # Only B's own certificate reaches that session (here: it takes it over, as a restarted
    # bridge does).
    again = secure_broker.certificate_probe("dev-b", "tether-anything").connect(
        clean_start=False, session_expiry_s=SESSION_S
    )
    try:
        bridge_b.disconnects.get(timeout=10)  # taken over (0x8E, or the socket closed first)
        assert again.session_present
    finally:
        again.close()


def test_the_fleet_agent_and_the_bridge_keep_their_sessions(
    tmp_path: Path,
    secure_broker: SecureBroker,
    fleet_agent_b: FleetAgent,
    bridge_b: Probe,
) -> None:
    """Both persistent clients of one device run side by side, and their sessions survive
    a disconnect: what arrives meanwhile is delivered when they come back."""
    worker = secure_broker.password_probe("cloud-worker").connect()
    try:
        # The certificate session (the Mosquitto bridge's): away, then back.
        bridge_b.close()
        assert worker.publish("tether/dev-b/cloud/replies/bridge", b"while away") == 0
        back = secure_broker.certificate_probe("dev-b", "tether-bridge-dev-b").connect(
            clean_start=False, session_expiry_s=SESSION_S
        )
        try:
            assert back.session_present
            assert [m.payload for m in back.received(QUIET_S)] == [b"while away"]
        finally:
            back.close()
        # The password session with the device's tagged id (the sensor bridge's, when it
        # talks to the fleet broker): the same id on every start, so the session is found.
        settings = fleet_agent_b.settings
        session_id = client_id_of(settings)
        assert session_id == client_id_of(settings) and session_id.startswith(
            "tether-bridge-dev-b-"
        )
        first = secure_broker.password_probe("dev-b", session_id).connect(
            clean_start=False, session_expiry_s=SESSION_S
        )
        assert first.subscribe("tether/dev-b/sensors/+/data") == 1
        first.close()
        sensor = secure_broker.password_probe("dev-b").connect()
        assert sensor.publish("tether/dev-b/sensors/cam/data", b"reading") == 0
        sensor.close()
        again = secure_broker.password_probe("dev-b", client_id_of(settings)).connect(
            clean_start=False, session_expiry_s=SESSION_S
        )
        try:
            assert again.session_present
            assert [m.payload for m in again.received(QUIET_S)] == [b"reading"]
        finally:
            again.close()
        # The fleet agent was connected through all of it, its id unchanged by a restart.
        assert fleet_agent_b.client.connected
        restarted = FleetAgent(
            fleet_agent_b.settings, RepositoryTarget(ModelRepository(settings.repository))
        )
        assert restarted.client.client_id == fleet_agent_b.client.client_id
    finally:
        worker.close()
