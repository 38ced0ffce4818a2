"""The MQTT adapter (shared/mqtt.py) against a real Mosquitto."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from harness.broker import Broker
from shared.mqtt import MqttClient, PackedPublishProperties


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


@pytest.mark.parametrize(
    "given",
    [
        {"response_topic": "tether/reply/dev-1/c-1", "correlation_data": b"\x00\xffid"},
        {"expiry_s": 70_000, "content_type": "image/jpeg"},
        {"user_properties": {"k": "v", "ümlaut": "ß" * 300}, "correlation_data": b"x" * 200},
        {"response_topic": "r", "correlation_data": b"c", "expiry_s": 1, "content_type": "t",
         "user_properties": {"a": "b"}},
    ],
)  # fmt: skip
def test_packed_publish_properties_read_back_as_paho_writes_them(given: dict[str, Any]) -> None:
    """What Tether packs itself, paho's own parser reads as the properties that were meant."""
    packed = PackedPublishProperties(**given).pack()
    parsed = Properties(PacketTypes.PUBLISH)
    _props, length = parsed.unpack(packed + b"payload")
    assert length == len(packed)
    expected = Properties(PacketTypes.PUBLISH)
    names = {
        "response_topic": "ResponseTopic",
        "correlation_data": "CorrelationData",
        "expiry_s": "MessageExpiryInterval",
        "content_type": "ContentType",
    }
    for key, value in given.items():
        if key == "user_properties":
            expected.UserProperty = list(value.items())
        else:
            setattr(expected, names[key], value)
    assert str(parsed) == str(expected)
    assert packed == expected.pack()  # byte for byte what paho would have sent
