"""The ``[sensors]`` section of the agent's settings: bindings, batching, outbox, metrics.

The bridge's knobs, read in one place; ``edge.settings`` mounts it as
``EdgeSettings.sensors`` (it lives outside ``edge/sensors/`` so that settings, which every
transport reads, import no transport). Topic templates may use ``{device}`` (the agent's
device id) and, for result and error topics, ``{sensor}`` (the segment of the data topic
that the filter's first ``+`` matched).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from serving.settings import Section
from shared.topics import SENSOR_DATA_TEMPLATE, SENSOR_TOPIC_TEMPLATE

DEFAULT_DATA_FILTER = SENSOR_DATA_TEMPLATE
DEFAULT_RESULTS_TOPIC = SENSOR_TOPIC_TEMPLATE.replace("{kind}", "inference")
DEFAULT_ERRORS_TOPIC = SENSOR_TOPIC_TEMPLATE.replace("{kind}", "errors")

#: ``auto`` and the names of ``edge.sensors.payloads.FORMATS`` (kept here: settings stay light).
PayloadFormatName = Literal["auto", "json", "raw"]
FullPolicy = Literal["drop_oldest", "refuse_new"]


class BindingSettings(Section):
    """One topic filter bound to one model: where readings come from and results go."""

    topic: str = Field(DEFAULT_DATA_FILTER, description="Topic filter of the readings.")
    model: str = Field("digits", description="Model name (a route name works) that answers.")
    version: str | None = Field(None, description="Model version (default: the route's choice).")
    results: str = Field(DEFAULT_RESULTS_TOPIC, description="Topic template of the results.")
    errors: str = Field(DEFAULT_ERRORS_TOPIC, description="Topic template of the error messages.")
    format: PayloadFormatName = Field(
        "auto",
        description="auto: MQTT content type, else JSON when the payload starts with { or [, "
        "else raw little-endian bytes; json or raw force one.",
    )

    @field_validator("topic")
    @classmethod
    def _one_sensor_wildcard(cls, value: str) -> str:
        if "+" not in value.split("/"):
            raise ValueError(f"topic filter {value!r} needs a '+' level for the sensor id")
        if value.startswith("$share/"):
            raise ValueError("a binding cannot be a shared subscription")
        return value


class BatchSettings(Section):
    """Micro-batching per model: a batch runs at ``max_messages`` or after ``max_delay_ms``."""

    max_messages: int = Field(32, ge=1, le=4096, description="Most readings run together.")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long the first reading of a batch waits for more."
    )


class IntakeSettings(Section):
    """The durable intake: readings stored (and then acknowledged) before they are inferred."""

    max_messages: int = Field(100_000, ge=1, description="Readings waiting to be inferred.")
    max_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="Payload bytes waiting.")
    policy: FullPolicy = Field(
        "drop_oldest",
        description="When full: drop_oldest (the oldest waiting readings go, counted) or "
        "refuse_new (the new reading is not stored, counted); both acknowledge the message.",
    )
    dedupe_window: int = Field(
        100_000, ge=1, description="Recent messages remembered to skip broker redeliveries."
    )


class OutboxSettings(Section):
    """The persistent outbox (SQLite in the data directory) and its policy when full."""

    max_messages: int = Field(100_000, ge=1, description="Records (results + escalations) kept.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Payload bytes kept.")
    policy: FullPolicy = Field(
        "drop_oldest",
        description="When full: drop_oldest (the oldest records go, counted) or refuse_new "
        "(the new record is not stored, counted).",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode of the bridge's file (intake and outbox): full "
        "survives power loss, normal only crashes.",
    )
    publish_window: int = Field(
        256, ge=1, le=1000, description="Results published before waiting for their PUBACKs."
    )


class SensorSettings(Section):
    """The MQTT sensor bridge (``tether bridge``)."""

    broker_url: str | None = Field(
        None, description="The device broker the sensors publish to (default: mqtt_url)."
    )
    client_id: str | None = Field(
        None,
        description="Fixed client id of the persistent session (default "
        "tether-bridge-<device>-<tag>, the tag a secret of the device: edge/session_ids.py).",
    )
    session_expiry_s: int = Field(
        86_400, ge=0, description="How long the broker keeps the session while the bridge is down."
    )
    qos: Literal[0, 1] = Field(1, description="QoS of the subscriptions and of the results.")
    bindings: list[BindingSettings] = Field(
        default_factory=lambda: [BindingSettings()], description="Topic filters and their models."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    queue_size: int = Field(
        65_535,
        ge=1,
        le=65_535,
        description="Readings delivered and not yet stored in the intake: the MQTT Receive "
        "Maximum, so a burst waits in flight to the bridge, not in the broker's bounded queue "
        "(at most 32 MiB of them are held in memory).",
    )
    batches_in_flight: int = Field(
        4,
        ge=1,
        le=64,
        description="Micro-batches of one model inferred at once: while some wait for cloud "
        "escalations the others go on (bounds the escalations in flight); results still "
        "leave in arrival order.",
    )
    max_payload_bytes: int = Field(
        1024 * 1024, ge=16, description="Largest reading accepted (an error message past it)."
    )
    intake: IntakeSettings = Field(default_factory=IntakeSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    corrections: bool = Field(
        False,
        description="Cascade: when the cloud cannot be reached, keep the escalation and publish "
        "the cloud's answer later as a correction.",
    )
    metrics_port: int | None = Field(
        9102, ge=0, le=65535, description="Prometheus port of the bridge (0: any free; none: off)."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")
