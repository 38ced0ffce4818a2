"""What identifies a reading (its id, ``seq`` and timestamp) and the rule those fields keep.

Identity fields come from the sender and are echoed in every message the bridge publishes
for the reading, so they are held to one rule: a scalar (string, number or boolean) of at
most :data:`MAX_IDENTITY_CHARS` characters. A reading that breaks it (a field that is an
object, an array, JSON nested hundreds of levels deep, a megabyte of text) gets an
``invalid_input`` error message for itself alone, and that message carries only the fields
that kept the rule. Nothing here raises: :class:`Identity` says what was wrong instead.

The reading id (docs/sensors.md, "Reading ids") is, in order: the payload's ``id`` (or the
V2 request id); its ``seq``; the MQTT 5 user property ``id``/``reading_id``/``seq``; the
correlation data (UTF-8, else hex); else ``h:`` + 24 hex digits of a SHA-256 of topic and
payload.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from shared.mqtt import Message

#: Longest identity field (characters of a string, digits of a number, bytes of correlation).
MAX_IDENTITY_CHARS = 256
#: Payloads larger than this are not parsed just to find the identity of a failed reading.
MAX_SCAN_BYTES = 1024 * 1024

ID_KEYS = ("id", "reading_id")
TIME_KEYS = ("timestamp", "ts", "time")
PROPERTY_ID_KEYS = ("id", "reading_id", "seq")

Scalar = str | int | float | bool


@dataclass
class Fields:
    """The identity fields a payload carried, each already checked against the rule."""

    id: str | None = None
    seq: Scalar | None = None
    timestamp: Scalar | None = None
    #: The first field that broke the rule, described (the reading gets an error for it).
    problem: str | None = None

    def note(self, problem: str | None) -> None:
        if problem is not None and self.problem is None:
            self.problem = problem


@dataclass(frozen=True)
class Identity:
    """A reading's id (and where it came from), ``seq``, timestamp and any broken rule."""

    reading_id: str
    source: str
    seq: Scalar | None = None
    timestamp: Scalar | None = None
    problem: str | None = None


def checked(name: str, value: Any) -> tuple[Scalar | None, str | None]:
    """``value`` when it keeps the identity rule, else ``None`` and what is wrong with it."""
    if value is None or isinstance(value, bool):
        return value, None
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value, None
        return None, f"reading field {name!r} is a number out of the 64-bit range"
    if isinstance(value, float):
        if math.isfinite(value):
            return value, None
        return None, f"reading field {name!r} must be a finite number"
    if isinstance(value, str):
        if len(value) > MAX_IDENTITY_CHARS:
            return None, (
                f"reading field {name!r} has {len(value)} characters; at most "
                f"{MAX_IDENTITY_CHARS} are allowed"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"reading field {name!r} is not valid UTF-8"
        return value, None
    return None, (
        f"reading field {name!r} must be a string, number or boolean (at most "
        f"{MAX_IDENTITY_CHARS} characters), got {_kind(value)}"
    )


def fields_of(body: Mapping[str, Any]) -> Fields:
    """The identity fields of a JSON object reading (each checked; problems noted)."""
    fields = Fields()
    for key in ID_KEYS:
        if body.get(key) is not None:
            value, problem = checked(key, body[key])
            fields.note(problem)
            if value is not None:
                fields.id = str(value)
            break
    fields.seq, problem = checked("seq", body.get("seq"))
    fields.note(problem)
    for key in TIME_KEYS:
        if key in body:
            fields.timestamp, problem = checked(key, body[key])
            fields.note(problem)
            break
    return fields


def add_parameters(fields: Fields, parameters: Mapping[str, Any]) -> Fields:
    """A V2 request's ``parameters`` fill a timestamp or ``seq`` the body did not carry."""
    if fields.timestamp is None:
        key = next((k for k in TIME_KEYS if k in parameters), None)
        if key is not None:
            fields.timestamp, problem = checked(f"parameters.{key}", parameters[key])
            fields.note(problem)
    if fields.seq is None and "seq" in parameters:
        fields.seq, problem = checked("parameters.seq", parameters["seq"])
        fields.note(problem)
    return fields


def best_effort_fields(payload: bytes) -> Fields | None:
    """The identity fields of a payload that failed to decode, when it is a JSON object."""
    if payload.lstrip()[:1] != b"{" or len(payload) > MAX_SCAN_BYTES:
        return None
    try:
        body = orjson.loads(payload)
    except (orjson.JSONDecodeError, RecursionError):
        return None
    return fields_of(body) if isinstance(body, dict) else None


def identify(message: Message, fields: Fields | None) -> Identity:
    """The reading's identity from its payload fields and MQTT 5 properties (never raises)."""
    problem = fields.problem if fields is not None else None
    props = message.user_properties
    seq = fields.seq if fields is not None else None
    timestamp = fields.timestamp if fields is not None else None
    if timestamp is None:
        key = next((k for k in TIME_KEYS if k in props), None)
        if key is not None:
            timestamp, bad = checked(key, props[key])
            problem = problem or bad
    reading_id: str | None = None
    source = ""
    if fields is not None and fields.id:
        reading_id, source = fields.id, "payload"
    elif seq is not None:
        reading_id, source = str(seq), "seq"
    else:
        for key in PROPERTY_ID_KEYS:
            if props.get(key):
                value, bad = checked(key, props[key])
                problem = problem or bad
                if value is not None:
                    reading_id, source = str(value), "property"
                    break
    if reading_id is None and message.correlation_data:
        data = message.correlation_data
        if len(data) > MAX_IDENTITY_CHARS:
            problem = problem or (
                f"correlation data has {len(data)} bytes; at most {MAX_IDENTITY_CHARS} are allowed"
            )
        else:
            try:
                reading_id = data.decode("utf-8")
            except UnicodeDecodeError:
                reading_id = data.hex()
            source = "correlation"
    if reading_id is None:
        topic = message.topic.encode("utf-8", "surrogatepass")
        digest = hashlib.sha256(topic + b"\0" + message.payload).hexdigest()
        reading_id, source = f"h:{digest[:24]}", "hash"
    return Identity(reading_id, source, seq, timestamp, problem)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
