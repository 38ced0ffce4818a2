"""Fleet MQTT messages: rollout orders, rollout events and device status.

* :class:`RolloutOrder`, controller -> device on ``tether/<device>/rollout`` (QoS 1,
  retained, so a device that reconnects gets its latest order).
* :class:`RolloutEvent`, device -> controller on ``tether/<device>/rollout/events`` (QoS 1).
* :class:`DeviceStatus`, device -> cloud on ``tether/<device>/status`` (retained); the same
  topic carries the device's MQTT last will ``{"kind":"device_status","device":...,
  "online":false}``.

The cloud identifies a device by the topic (which the broker's ACL authorised), never by a
``device`` field in the payload.

Order semantics, as the device agent implements them:

* ``install``: verify ``signed_manifest``, download, check sha256, stage, activate (events
  ``received`` .. ``active``); then watch health for ``health_window_s`` (mirroring a
  ``shadow_sample_rate`` share of requests to the cloud teacher) and report ``committed``
  with a :class:`HealthReport`, or roll itself back (``rolled_back``) if its own checks fail.
  ``active`` events may repeat during the window with interim health reports.
* ``rollback``: make ``rollback_to`` the active version again (``None``: the model had no
  earlier version, so unload it), cancel any install of the rollout, report ``rolled_back``.
  Works after ``committed`` too (the device keeps the previous version).
* ``abort``: stop an install of ``rollout_id`` wherever it is; undo it if it already became
  active (like ``rollback`` to ``rollback_to``); report ``rolled_back`` with reason
  ``"aborted"``.

Every order is signed with the fleet key for one device, with a sequence number and an
expiry (:mod:`shared.order_signing`); a device acts on nothing else.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from shared.errors import InvalidInput
from shared.manifest import SignedManifest
from shared.model_names import is_model_name
from shared.protocol import VersionedModel
from shared.topics import ROOT
from shared.versioning import SchemaVersion

FLEET_SCHEMA = SchemaVersion(1, 1)
#: Rollout orders: 1.2 added the signature and what it binds (device, seq, expires_at).
ORDER_SCHEMA = SchemaVersion(1, 2)

#: Topic filters the cloud subscribes to.
STATUS_FILTER = f"{ROOT}/+/status"
EVENTS_FILTER = f"{ROOT}/+/rollout/events"

RolloutAction = Literal["install", "rollback", "abort"]
RolloutStep = Literal[
    "received",
    "downloading",
    "verifying",
    "staged",
    "active",
    "committed",
    "failed",
    "rolled_back",
    "refused",
]
#: Steps after which a device does nothing more for a rollout.
FINAL_STEPS: frozenset[str] = frozenset({"committed", "failed", "rolled_back", "refused"})


def _model_name(name: str) -> str:
    if not is_model_name(name):
        raise ValueError(
            "not a model name (letters, digits, '_', '.', '-'; a letter or digit first)"
        )
    return name


class FleetMessage(VersionedModel):
    """Base of the fleet messages: a schema version and a ``kind``."""

    SCHEMA: ClassVar[SchemaVersion] = FLEET_SCHEMA
    kind: str


class HealthReport(VersionedModel):
    """A device's health of the new version over (part of) its health window.

    ``shadow_agreement`` is the fraction of shadow-sampled requests where the new version's
    top-1 equals the cloud teacher's. ``baseline_*`` describe the previous version on the
    same device, when the agent knows them.
    """

    SCHEMA: ClassVar[SchemaVersion] = FLEET_SCHEMA

    requests: int = Field(0, ge=0)
    errors: int = Field(0, ge=0)
    p99_ms: float | None = Field(None, ge=0)
    shadow_samples: int = Field(0, ge=0)
    shadow_agreement: float | None = Field(None, ge=0, le=1)
    baseline_p99_ms: float | None = Field(None, ge=0)
    baseline_error_rate: float | None = Field(None, ge=0, le=1)
    baseline_shadow_agreement: float | None = Field(None, ge=0, le=1)

    @property
    def error_rate(self) -> float | None:
        """errors / requests, or ``None`` with no requests."""
        return self.errors / self.requests if self.requests else None


class RolloutOrder(FleetMessage):
    """Controller -> device: install, roll back or abort one model version.

    Schema 1.2 added ``device``, ``seq``, ``expires_at``, ``signature`` and ``key_id``: the
    fleet key signs the whole order for one device, so it cannot be forged, altered, sent
    to another device, or replayed later (:mod:`shared.order_signing`). They are optional
    in the schema, as a new minor's fields must be, so an older order still parses; a
    device refuses it as unsigned. ``model`` must be a model name
    (:mod:`shared.model_names`), checked on parsing (not in the JSON Schema, which a minor
    may not tighten): it becomes a folder on the device.
    """

    SCHEMA: ClassVar[SchemaVersion] = ORDER_SCHEMA

    kind: Literal["rollout_order"] = "rollout_order"
    rollout_id: str = Field(min_length=1, max_length=200)
    action: RolloutAction
    model: Annotated[str, AfterValidator(_model_name)] = Field(min_length=1, max_length=128)
    signed_manifest: SignedManifest | None = None
    rollback_to: int | None = Field(None, ge=1)
    health_window_s: float = Field(60.0, ge=0)
    shadow_sample_rate: float = Field(0.0, ge=0, le=1)
    issued_at: float
    wave: int | None = Field(None, ge=1, description="Since 1.1: the wave (from 1) ordered.")
    device: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Since 1.2: the one device this order is for (signed).",
    )
    seq: int | None = Field(
        None,
        ge=1,
        description="Since 1.2: increases with every order the controller signs; a device "
        "refuses one not newer than the last it accepted (a replay).",
    )
    expires_at: float | None = Field(
        None, description="Since 1.2: Unix time after which a device refuses it."
    )
    signature: str | None = Field(
        None,
        max_length=200,
        description="Since 1.2: base64 ed25519 signature (shared.order_signing).",
    )
    key_id: str | None = Field(
        None, max_length=64, description="Since 1.2: hint of which key signed it."
    )

    @model_validator(mode="after")
    def _install_needs_manifest(self) -> RolloutOrder:
        if self.action == "install" and self.signed_manifest is None:
            raise ValueError("an install order needs a signed_manifest")
        return self


class RolloutEvent(FleetMessage):
    """Device -> controller: one step of a rollout on this device."""

    kind: Literal["rollout_event"] = "rollout_event"
    rollout_id: str = Field(min_length=1, max_length=200)
    device: str = Field("", description="Informational; the topic says which device.")
    model: str
    version: int
    step: RolloutStep
    reason: str = ""
    health: HealthReport | None = None
    at: float
    bytes_downloaded: int | None = Field(
        None, ge=0, description="Since 1.1: bytes fetched for this install (delta or full)."
    )
    delta_from: int | None = Field(
        None, ge=1, description="Since 1.1: the version a delta was applied to, if one was."
    )


class ModelState(VersionedModel):
    """One model on a device: active and previous version, and what the agent is doing."""

    SCHEMA: ClassVar[SchemaVersion] = FLEET_SCHEMA

    active: int | None = None
    previous: int | None = None
    state: str = ""
    rollout_id: str | None = Field(
        None, description="Since 1.1: the rollout the device last acted on for this model."
    )


class DeviceStatus(FleetMessage):
    """Device -> cloud, retained: who the device is and what it runs (also its last will)."""

    kind: Literal["device_status"] = "device_status"
    device: str = Field("", description="Informational; the topic says which device.")
    online: bool
    agent_version: str = ""
    hardware: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    models: dict[str, ModelState] = Field(default_factory=dict)
    health: dict[str, object] = Field(default_factory=dict)
    at: float | None = None


def device_of_topic(topic: str) -> str:
    """The device id of a ``tether/<device>/...`` topic."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT or not parts[1]:
        raise InvalidInput(f"{topic!r} is not a device topic")
    return parts[1]


#: Fleet message types, for JSON Schema generation.
FLEET_TYPES: tuple[type[VersionedModel], ...] = (
    RolloutOrder,
    RolloutEvent,
    DeviceStatus,
    HealthReport,
)
