"""The MQTT adapter (shared/mqtt.py) against a real Mosquitto."""

from __future__ import annotations

import os
import uuid

from harness.broker import Broker
from shared.mqtt import MqttClient


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_stopped_clients_give_their_descriptors_back(broker: Broker) -> None:
    """A process that runs many clients (a gateway, a fleet simulator) or restarts one keeps
    its descriptors: paho watches them with select(), which fails past 1023."""
    warm = MqttClient(broker.url, f"fd-warm-{uuid.uuid4().hex[:6]}")
    warm.start()
    warm.stop()
    before = open_descriptors()
    for i in range(30):
        client = MqttClient(broker.url, f"fd-{i}-{uuid.uuid4().hex[:6]}")
        client.start()
        assert client.connected
        client.stop()
    assert open_descriptors() - before <= 2


def test_a_client_started_again_connects(broker: Broker) -> None:
    client = MqttClient(broker.url, f"again-{uuid.uuid4().hex[:6]}")
    for _ in range(3):
        client.start()
        assert client.connected
        client.stop()
        assert not client.connected
