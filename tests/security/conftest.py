"""Security fixtures: a test fleet CA, and a Mosquitto running the shipped TLS + ACL config
with provisioned devices ``dev-a`` and ``dev-b`` and the two cloud-side identities."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.secure_broker import Pki, SecureBroker

DEVICES = ("dev-a", "dev-b")
SERVICES = ("cloud-worker", "fleet-controller")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A fleet CA made for this test session, with the broker's certificate."""
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def secure_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureBroker]:
    """The shipped secure.conf + acl, with every identity provisioned by cloud.provision."""
    broker = SecureBroker(tmp_path_factory.mktemp("secure-mosquitto"), pki)
    for device in DEVICES:
        broker.provision(device)
    for service in SERVICES:
        broker.provision(service, service=True)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def trust_fleet_ca(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make the fleet CA this process's trust store, as a provisioned device installs it
    (Tether's MQTT client verifies ``mqtts://`` brokers against the default store)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_file))
    return pki.ca_file
