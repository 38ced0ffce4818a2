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

What a device sends (statuses and events) is bounded when it is read, so that one device
cannot cost the cloud more than its own report: the message's size, depth and number of
values (:mod:`shared.bounded_json`), and every field: texts by length (a ``reason`` is cut
to :data:`MAX_REASON_CHARS`), labels and models by count, numbers to what the database
columns hold. These checks are validators, not JSON Schema constraints (a minor may not
tighten the schema); a message outside them is refused whole, like a malformed one.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from shared.bounded_json import check_shape, load_bounded, truncate
from shared.errors import InvalidInput
from shared.manifest import SignedManifest
from shared.model_names import is_model_name
from shared.protocol import VersionedModel
from shared.topics import ROOT
from shared.versioning import SchemaVersion

FLEET_SCHEMA = SchemaVersion(1, 1)
#: Rollout events and their health reports: 1.2 added ``baseline_shadow_samples`` (how
#: many shadow samples the baseline agreement rests on). Device statuses stay at 1.1.
EVENT_SCHEMA = SchemaVersion(1, 2)
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

#: A device's ``reason`` is cut to this many characters when read (not refused: it is
#: the explanation an operator needs, and the start of it says the most).
MAX_REASON_CHARS = 1000
#: The longest short text of a report (versions, hardware, states, model names, ids).
MAX_TEXT_CHARS = 200
#: Labels and models one status may carry, and the longest label key and value.
MAX_LABELS, MAX_MODELS = 64, 256
MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS = 64, 256
#: How deep, and how many values, a status's free-form ``health`` may hold.
MAX_HEALTH_DEPTH, MAX_HEALTH_NODES = 8, 5000
#: The largest count or version a report may carry: exact as a float, and (versions) in
#: the database's 32-bit integer column.
MAX_COUNT = 2**53
MAX_VERSION = 2**31 - 1


def _model_name(name: str) -> str:
    if not is_model_name(name):
        raise ValueError(
            "not a model name (letters, digits, '_', '.', '-'; a letter or digit first)"
        )
    return name


def _short_text(text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"longer than {MAX_TEXT_CHARS} characters")
    if "\x00" in text:
        raise ValueError("contains a NUL character")
    return text


def _reason(value: Any) -> Any:
    """A reason cut to :data:`MAX_REASON_CHARS`, NUL characters (which PostgreSQL's text
    refuses) replaced; anything but a string is left for the type check to refuse."""
    if isinstance(value, str):
        return truncate(value.replace("\x00", "\ufffd"), MAX_REASON_CHARS)
    return value


def _count(value: int) -> int:
    if value > MAX_COUNT:
        raise ValueError(f"over {MAX_COUNT}")
    return value


def _version(value: int) -> int:
    if not 0 <= value <= MAX_VERSION:
        raise ValueError(f"not between 0 and {MAX_VERSION}")
    return value


def _labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise ValueError(f"more than {MAX_LABELS} labels")
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
            raise ValueError(
                f"label keys are at most {MAX_LABEL_KEY_CHARS} characters, values "
                f"{MAX_LABEL_VALUE_CHARS}"
            )
    return labels


def _models(models: dict[str, Any]) -> dict[str, Any]:
    if len(models) > MAX_MODELS:
        raise ValueError(f"more than {MAX_MODELS} models")
    for name in models:
        _short_text(name)
    return models


def _health(health: dict[str, object]) -> dict[str, object]:
    try:
        check_shape(health, max_depth=MAX_HEALTH_DEPTH, max_nodes=MAX_HEALTH_NODES, what="health")
    except InvalidInput as exc:
        raise ValueError(exc.message) from None
    return health


ShortText = Annotated[str, AfterValidator(_short_text)]
Reason = Annotated[str, BeforeValidator(_reason)]
Count = Annotated[int, AfterValidator(_count)]

R = TypeVar("R", bound="DeviceReport")


class FleetMessage(VersionedModel):
    """Base of the fleet messages: a schema version and a ``kind``."""

    SCHEMA: ClassVar[SchemaVersion] = FLEET_SCHEMA
    kind: str


class DeviceReport(FleetMessage):
    """A message a device sends the cloud: read with bounded size, depth and values."""

    @classmethod
    def parse(cls: type[R], raw: bytes | str | dict[str, Any]) -> R:
        if isinstance(raw, (bytes, str)):
            raw = load_bounded(raw, what=cls.__name__)
        return super().parse(raw)


class HealthReport(VersionedModel):
    """A device's health of the new version over (part of) its health window.

    ``shadow_agreement`` is the fraction of shadow-sampled requests where the new version's
    top-1 equals the cloud teacher's. ``baseline_*`` describe the previous version on the
    same device, when the agent knows them; ``baseline_shadow_samples`` (since 1.2) is how
    many shadow samples ``baseline_shadow_agreement`` rests on. A report without it (a 1.0
    or 1.1 device) gives the controller no baseline evidence: it reads as 0 samples.
    """

    SCHEMA: ClassVar[SchemaVersion] = EVENT_SCHEMA

    requests: Count = Field(0, ge=0)
    errors: Count = Field(0, ge=0)
    p99_ms: float | None = Field(None, ge=0)
    shadow_samples: Count = Field(0, ge=0)
    shadow_agreement: float | None = Field(None, ge=0, le=1)
    baseline_p99_ms: float | None = Field(None, ge=0)
    baseline_error_rate: float | None = Field(None, ge=0, le=1)
    baseline_shadow_agreement: float | None = Field(None, ge=0, le=1)
    baseline_shadow_samples: Annotated[int, Field(ge=0), AfterValidator(_count)] | None = Field(
        None,
        description="Since 1.2: shadow samples of the previous version behind "
        "baseline_shadow_agreement (absent: no baseline evidence).",
    )

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


class RolloutEvent(DeviceReport):
    """Device -> controller: one step of a rollout on this device (schema 1.2: its
    ``health`` may carry ``baseline_shadow_samples``)."""

    SCHEMA: ClassVar[SchemaVersion] = EVENT_SCHEMA
    kind: Literal["rollout_event"] = "rollout_event"
    rollout_id: ShortText = Field(min_length=1, max_length=200)
    device: ShortText = Field("", description="Informational; the topic says which device.")
    model: ShortText
    version: Annotated[int, AfterValidator(_version)]
    step: RolloutStep
    reason: Reason = ""
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

    active: Annotated[int, AfterValidator(_version)] | None = None
    previous: Annotated[int, AfterValidator(_version)] | None = None
    state: ShortText = ""
    rollout_id: ShortText | None = Field(
        None, description="Since 1.1: the rollout the device last acted on for this model."
    )


class DeviceStatus(DeviceReport):
    """Device -> cloud, retained: who the device is and what it runs (also its last will)."""

    kind: Literal["device_status"] = "device_status"
    device: ShortText = Field("", description="Informational; the topic says which device.")
    online: bool
    agent_version: ShortText = ""
    hardware: ShortText = ""
    labels: Annotated[dict[str, str], AfterValidator(_labels)] = Field(default_factory=dict)
    models: Annotated[dict[str, ModelState], AfterValidator(_models)] = Field(default_factory=dict)
    health: Annotated[dict[str, object], AfterValidator(_health)] = Field(default_factory=dict)
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
