"""The shipped broker config (TLS, passwords, certificates, ACL) against a real Mosquitto.

Mosquitto 2.0's ACL file does not refuse a SUBSCRIBE (SUBACK grants it); it checks every
message at delivery, so "cannot read" is shown by a message, published by someone allowed
to, that never reaches the subscriber while an allowed subscriber gets it. A denied
PUBLISH is answered PUBACK 0x87 (MQTT 5) and never delivered; an allowed one 0x00, or
0x10 when nobody subscribed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.security.secure_broker import (
    NOT_AUTHORIZED,
    Pki,
    Probe,
    Refused,
    SecureBroker,
)

OK = 0x00
NO_SUBSCRIBERS = 0x10  # a success code: accepted, nobody subscribed
ALLOWED = (OK, NO_SUBSCRIBERS)


def password_probe(broker: SecureBroker, name: str) -> Probe:
    identity = broker.identities[name]
    return Probe(
        broker.password_port, broker.pki.ca_file, username=name, password=identity.password
    ).connect()


@pytest.fixture
def probes(secure_broker: SecureBroker) -> Iterator[dict[str, Probe]]:
    """One connected probe per identity (password listener)."""
    made = {
        name: password_probe(secure_broker, name)
        for name in ("dev-a", "dev-b", "cloud-worker", "fleet-controller")
    }
    yield made
    for probe in made.values():
        probe.close()


def topics_of(probe: Probe, wait_s: float = 0.5) -> list[str]:
    return [message.topic for message in probe.received(wait_s)]


# ---------------------------------------------------------------------- replies


def test_a_device_cannot_read_another_devices_replies(probes: dict[str, Probe]) -> None:
    a, b, worker = probes["dev-a"], probes["dev-b"], probes["cloud-worker"]
    b.subscribe("tether/dev-b/cloud/replies/+")
    for stolen in (
        "tether/dev-b/cloud/replies/+",
        "tether/dev-b/cloud/replies/dev-b-1",
        "tether/+/cloud/replies/+",
        "tether/#",
        "#",
        "$share/steal/tether/dev-b/cloud/replies/+",
    ):
        a.subscribe(stolen)
    assert worker.publish("tether/dev-b/cloud/replies/dev-b-1", b"answer") in ALLOWED
    assert topics_of(b) == ["tether/dev-b/cloud/replies/dev-b-1"]
    assert topics_of(a, 0.2) == []


def test_a_device_cannot_answer_another_devices_request(probes: dict[str, Probe]) -> None:
    a, b = probes["dev-a"], probes["dev-b"]
    b.subscribe("tether/dev-b/cloud/replies/+")
    assert a.publish("tether/dev-b/cloud/replies/dev-b-1", b"forged") == NOT_AUTHORIZED
    assert topics_of(b, 0.3) == []


# ---------------------------------------------------------------------- requests


def test_a_device_cannot_send_requests_as_another_device(probes: dict[str, Probe]) -> None:
    a, worker = probes["dev-a"], probes["cloud-worker"]
    worker.subscribe("tether/cloud/infer/+/+")
    assert a.publish("tether/cloud/infer/dev-b/dense", b"as b") == NOT_AUTHORIZED
    assert a.publish("tether/cloud/infer/dev-a/dense", b"as a") in ALLOWED
    assert topics_of(worker) == ["tether/cloud/infer/dev-a/dense"]


def test_a_device_cannot_read_other_devices_requests(probes: dict[str, Probe]) -> None:
    a, b, worker = probes["dev-a"], probes["dev-b"], probes["cloud-worker"]
    worker.subscribe("$share/tether-cloud/tether/cloud/infer/+/+")
    for stolen in ("tether/cloud/infer/#", "$share/tether-cloud/tether/cloud/infer/+/+", "#"):
        a.subscribe(stolen)
    assert b.publish("tether/cloud/infer/dev-b/dense", b"request") in ALLOWED
    assert topics_of(worker) == ["tether/cloud/infer/dev-b/dense"]
    assert topics_of(a, 0.2) == []


# ---------------------------------------------------------------------- rollouts, sensors, status


@pytest.mark.parametrize(
    "topic",
    [
        "tether/dev-b/rollout",  # a rollout order for another device
        "tether/dev-a/rollout",  # ... or for itself: orders come from the controller only
        "tether/dev-b/sensors/cam/inference",  # a sensor result for another device
        "tether/dev-b/sensors/cam/data",
        "tether/dev-b/status",
        "tether/dev-b/rollout/events",
        "tether/cloud/workers/w1/barrier",
    ],
)
def test_a_device_cannot_publish_outside_its_own_topics(
    probes: dict[str, Probe], topic: str
) -> None:
    a, b, controller = probes["dev-a"], probes["dev-b"], probes["fleet-controller"]
    b.subscribe("tether/dev-b/rollout")
    b.subscribe("tether/dev-b/sensors/#")
    controller.subscribe("tether/+/status")
    controller.subscribe("tether/+/rollout/events")
    assert a.publish(topic, b"hostile", retain=True) == NOT_AUTHORIZED
    assert topics_of(b, 0.3) == [] and topics_of(controller, 0.1) == []


def test_a_device_publishes_its_own_sensor_results_status_and_events(
    probes: dict[str, Probe],
) -> None:
    a, controller = probes["dev-a"], probes["fleet-controller"]
    a.subscribe("tether/dev-a/sensors/+/data")
    controller.subscribe("tether/+/status")
    controller.subscribe("tether/+/rollout/events")
    for topic in (
        "tether/dev-a/sensors/cam/data",
        "tether/dev-a/sensors/cam/inference",
        "tether/dev-a/sensors/cam/errors",
        "tether/dev-a/status",
        "tether/dev-a/rollout/events",
    ):
        assert a.publish(topic, b"{}") in ALLOWED, topic
    assert topics_of(a) == ["tether/dev-a/sensors/cam/data"]
    assert sorted(topics_of(controller)) == ["tether/dev-a/rollout/events", "tether/dev-a/status"]


def test_only_the_controller_sends_rollout_orders(probes: dict[str, Probe]) -> None:
    a, b, controller = probes["dev-a"], probes["dev-b"], probes["fleet-controller"]
    a.subscribe("tether/dev-a/rollout")
    b.subscribe("tether/dev-a/rollout")  # not b's
    assert controller.publish("tether/dev-a/rollout", b"order") in ALLOWED
    assert topics_of(a) == ["tether/dev-a/rollout"]
    assert topics_of(b, 0.2) == []
    # the controller itself cannot act as a device or a worker
    assert controller.publish("tether/dev-a/cloud/replies/x", b"x") == NOT_AUTHORIZED


def test_the_cloud_worker_cannot_send_rollout_orders(probes: dict[str, Probe]) -> None:
    a, worker = probes["dev-a"], probes["cloud-worker"]
    a.subscribe("tether/dev-a/rollout")
    assert worker.publish("tether/dev-a/rollout", b"order") == NOT_AUTHORIZED
    assert topics_of(a, 0.3) == []


# ---------------------------------------------------------------------- who may connect


def test_provisioned_devices_connect_over_tls(secure_broker: SecureBroker) -> None:
    password_probe(secure_broker, "dev-a").close()


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("dev-a", "wrong-password"),
        ("dev-a", None),
        ("dev-c", "never-provisioned"),
        (None, None),
    ],
)
def test_bad_credentials_are_refused(
    secure_broker: SecureBroker, username: str | None, password: str | None
) -> None:
    probe = Probe(
        secure_broker.password_port,
        secure_broker.pki.ca_file,
        username=username,
        password=password,
    )
    with pytest.raises(Refused, match=r"0x87|0x86"):
        probe.connect()


def test_another_devices_password_is_refused(secure_broker: SecureBroker) -> None:
    probe = Probe(
        secure_broker.password_port,
        secure_broker.pki.ca_file,
        username="dev-a",
        password=secure_broker.identities["dev-b"].password,
    )
    with pytest.raises(Refused):
        probe.connect()


def test_certificate_listener_refuses_clients_without_a_fleet_certificate(
    secure_broker: SecureBroker, tmp_path_factory: pytest.TempPathFactory
) -> None:
    port, ca_file = secure_broker.cert_port, secure_broker.pki.ca_file
    with pytest.raises(Refused):
        Probe(port, ca_file).connect()
    with pytest.raises(Refused):  # a password is no substitute for the certificate
        Probe(
            port, ca_file, username="dev-a", password=secure_broker.identities["dev-a"].password
        ).connect()
    rogue = Pki.create(tmp_path_factory.mktemp("rogue-ca"))  # a CA the broker does not trust
    with pytest.raises(Refused):
        Probe(port, ca_file, cert=rogue.client_cert("dev-a")).connect()


def test_certificate_identity_is_its_common_name(
    secure_broker: SecureBroker, probes: dict[str, Probe]
) -> None:
    pki = secure_broker.pki
    a = Probe(secure_broker.cert_port, pki.ca_file, cert=pki.client_cert("dev-a")).connect()
    try:
        a.subscribe("tether/dev-a/rollout")
        a.subscribe("tether/dev-b/rollout")
        controller = probes["fleet-controller"]
        assert controller.publish("tether/dev-a/rollout", b"for a") in ALLOWED
        assert controller.publish("tether/dev-b/rollout", b"for b") in ALLOWED
        assert topics_of(a) == ["tether/dev-a/rollout"]
        assert a.publish("tether/cloud/infer/dev-b/dense", b"as b") == NOT_AUTHORIZED
        assert a.publish("tether/cloud/infer/dev-a/dense", b"as a") in ALLOWED
    finally:
        a.close()


def test_plain_mqtt_is_not_offered(secure_broker: SecureBroker) -> None:
    """No listener speaks MQTT without TLS (a plain CONNECT gets no CONNACK)."""
    import socket

    connect = bytes.fromhex("101000044d5154540502003c000003616263")  # MQTT 5 CONNECT "abc"
    for port in (secure_broker.password_port, secure_broker.cert_port):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(connect)
            sock.settimeout(2)
            try:
                answer = sock.recv(16)
            except (TimeoutError, ConnectionResetError):
                answer = b""
            assert not answer.startswith(b"\x20"), "a CONNACK over plain TCP"
