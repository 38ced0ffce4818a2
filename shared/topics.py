"""MQTT topic names: the one place they are spelled.

Every device-scoped topic starts with ``tether/<device>/`` so a broker ACL pattern
``tether/%u/#`` confines a device to its own topics. Cloud inference requests go to
``tether/cloud/infer/<device>/<model>``, which cloud workers consume through one shared
subscription; the device id a worker trusts is the one in the topic, which the broker's
ACL authorised, never one in the payload.

The device ids ``cloud`` and ``fleet`` are reserved: ``tether/cloud/...`` and
``tether/fleet/...`` belong to the cloud side, so no ACL pattern ``tether/%u/...`` may ever
name them for a device (see deploy/mosquitto/acl and docs/security.md).
"""

from __future__ import annotations

from shared.errors import InvalidInput

ROOT = "tether"
CLOUD_SHARE_GROUP = "tether-cloud"


def check_segment(value: str, what: str) -> str:
    """Reject ids that would break topic structure (``/``, ``+``, ``#``, empty)."""
    if not value or any(c in value for c in "/+#\x00") or len(value) > 128:
        raise InvalidInput(f"{what} {value!r} cannot be used in an MQTT topic")
    return value


#: Device ids that would alias the cloud side's topics under ``tether/<id>/``.
RESERVED_DEVICE_IDS = frozenset({"cloud", "fleet"})


def check_device(value: str) -> str:
    """A device id fit for ``tether/<device>/``: a topic segment that is not reserved."""
    check_segment(value, "device id")
    if value.lower() in RESERVED_DEVICE_IDS:
        raise InvalidInput(f"device id {value!r} is reserved for the cloud side")
    return value


def cloud_request(device: str, model: str) -> str:
    """Where a device publishes a cloud inference request."""
    return f"{ROOT}/cloud/infer/{check_device(device)}/{check_segment(model, 'model')}"


def cloud_request_filter(group: str = CLOUD_SHARE_GROUP) -> str:
    """The shared subscription all cloud workers join, so they split the load."""
    return f"$share/{group}/{ROOT}/cloud/infer/+/+"


def parse_cloud_request(topic: str) -> tuple[str, str]:
    """``(device, model)`` of a cloud request topic."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[:3] != [ROOT, "cloud", "infer"]:
        raise InvalidInput(f"{topic!r} is not a cloud request topic")
    return check_device(parts[3]), check_segment(parts[4], "model")


def cloud_worker_barrier(worker: str) -> str:
    """A cloud worker's private topic, to learn when the broker has applied its (un)subscribe."""
    return f"{ROOT}/cloud/workers/{check_segment(worker, 'worker id')}/barrier"


def cloud_replies(device: str, client: str) -> str:
    """Where the cloud answers one uplink connection of a device."""
    return f"{ROOT}/{check_device(device)}/cloud/replies/{check_segment(client, 'client id')}"


def parse_cloud_replies(topic: str) -> tuple[str, str]:
    """``(device, client)`` of a cloud reply topic ``tether/<device>/cloud/replies/<client>``."""
    parts = topic.split("/")
    if (
        len(parts) != 5
        or parts[0] != ROOT
        or parts[2:4] != ["cloud", "replies"]
        or not parts[1]
        or not parts[4]
        or any(c in topic for c in "+#\x00")
    ):
        raise InvalidInput(f"{topic!r} is not a cloud reply topic")
    return parts[1], parts[4]


def broker_probe(device: str, client: str) -> str:
    """Where one connection of a device times round trips through the broker
    (``<this>/ask`` and ``<this>/answer``, see edge/broker_check.py)."""
    return f"{ROOT}/{check_device(device)}/probe/{check_segment(client, 'client id')}"


#: A device's sensor readings (the filter the bridge subscribes to by default).
SENSOR_DATA_TEMPLATE = ROOT + "/{device}/sensors/+/data"
#: One sensor's topic of one kind: ``data`` (readings), ``inference`` (results), ``errors``.
SENSOR_TOPIC_TEMPLATE = ROOT + "/{device}/sensors/{sensor}/{kind}"


def sensor_data_filter(device: str) -> str:
    return SENSOR_DATA_TEMPLATE.format(device=check_device(device))


def sensor_topic(device: str, sensor: str, kind: str) -> str:
    """``tether/<device>/sensors/<sensor>/<kind>`` with kind data, inference or errors."""
    return SENSOR_TOPIC_TEMPLATE.format(
        device=check_device(device), sensor=check_segment(sensor, "sensor id"), kind=kind
    )


def device_status(device: str) -> str:
    """The device's retained status (and its last will)."""
    return f"{ROOT}/{check_device(device)}/status"


def device_rollout(device: str) -> str:
    """Rollout orders for one device (published by the rollout controller only)."""
    return f"{ROOT}/{check_device(device)}/rollout"


def device_rollout_events(device: str) -> str:
    """A device's reports on rollout steps."""
    return f"{ROOT}/{check_device(device)}/rollout/events"
