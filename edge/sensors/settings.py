"""The ``[sensors]`` section of the agent's settings: bindings, batching, outbox, metrics.

Lives beside the bridge so the bridge's knobs are read in one place; ``edge.settings``
mounts it as ``EdgeSettings.sensors``. Topic templates may use ``{device}`` (the agent's
device id) and, for result and error topics, ``{sensor}`` (the segment of the data topic
that the filter's first ``+`` matched).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_DATA_FILTER = "tether/{device}/sensors/+/data"
DEFAULT_RESULTS_TOPIC = "tether/{device}/sensors/{sensor}/inference"
DEFAULT_ERRORS_TOPIC = "tether/{device}/sensors/{sensor}/errors"

PayloadFormat = Literal["auto", "json", "raw"]
OutboxPolicy = Literal["drop_oldest", "refuse_new"]


class _Section(BaseModel):
    """A settings section: unknown keys are an error (same rule as ``edge.settings``)."""

    model_config = ConfigDict(extra="forbid")


class BindingSettings(_Section):
    """One topic filter bound to one model: where readings come from and results go."""

    topic: str = Field(DEFAULT_DATA_FILTER, description="Topic filter of the readings.")
    model: str = Field("digits", description="Model name (a route name works) that answers.")
    version: str | None = Field(None, description="Model version (default: the route's choice).")
    results: str = Field(DEFAULT_RESULTS_TOPIC, description="Topic template of the results.")
    errors: str = Field(DEFAULT_ERRORS_TOPIC, description="Topic template of the error messages.")
    format: PayloadFormat = Field(
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


class BatchSettings(_Section):
    """Micro-batching per model: a batch runs at ``max_messages`` or after ``max_delay_ms``."""

    max_messages: int = Field(32, ge=1, le=4096, description="Most readings run together.")
    max_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long the first reading of a batch waits for more."
    )


class OutboxSettings(_Section):
    """The persistent outbox (SQLite in the data directory) and its policy when full."""

    max_messages: int = Field(100_000, ge=1, description="Records (results + escalations) kept.")
    max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="Payload bytes kept.")
    policy: OutboxPolicy = Field(
        "drop_oldest",
        description="When full: drop_oldest (the oldest records go, counted) or refuse_new "
        "(the new record is not stored, counted).",
    )
    synchronous: Literal["full", "normal"] = Field(
        "full",
        description="SQLite synchronous mode: full survives power loss, normal only crashes.",
    )
    publish_window: int = Field(
        256, ge=1, le=1000, description="Results published before waiting for their PUBACKs."
    )
    dedupe_window: int = Field(
        100_000, ge=1, description="Recent reading ids remembered to skip broker redeliveries."
    )


class SensorSettings(_Section):
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
        256,
        ge=1,
        le=65_535,
        description="Readings held in memory per model; also the MQTT Receive Maximum, so the "
        "broker holds back the rest (back-pressure).",
    )
    max_payload_bytes: int = Field(
        1024 * 1024, ge=16, description="Largest reading accepted (an error message past it)."
    )
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

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> SensorSettings:
        if self.queue_size < self.batch.max_messages:
            raise ValueError(
                f"sensors.queue_size ({self.queue_size}) must hold a whole batch "
                f"({self.batch.max_messages} messages)"
            )
        return self
