"""What the bridge publishes: one result or error message per reading, and corrections.

A result is the V2 inference response HTTP clients get (``model_name``, ``model_version``,
``id`` = the reading id, ``outputs``, ``parameters`` with ``served_by``/``route``/...), plus
the reading's ``sensor``, ``reading_id``, ``seq``, ``timestamp``, ``received_at`` and source
``topic``. Readers of V2 responses ignore the extra keys. An error message is the error body
every transport sends (``{"error": ...}``) plus ``reason``, ``status`` and the same identity.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edge.sensors.bindings import Binding
from edge.sensors.identity import Scalar
from edge.sensors.payloads import DecodedReading
from serving.provenance import Provenance
from shared.codec import build_response
from shared.errors import TetherError
from shared.mqtt import Message

RESULT_SCHEMA = "1.0"
_DUMPS = orjson.OPT_SERIALIZE_NUMPY


@dataclass
class Reading:
    """One sensor message on its way through the bridge."""

    message: Message
    binding: Binding
    sensor: str
    #: Set once the payload is decoded (see :func:`edge.sensors.payloads.reading_id`).
    reading_id: str = ""
    id_source: str = ""
    timestamp: Scalar | None = None
    seq: Scalar | None = None
    #: What broke the identity rule (the reading gets an ``invalid_input`` error for it).
    problem: str | None = None
    received_at: float = field(default_factory=time.time)
    decoded: DecodedReading | None = None

    @property
    def key(self) -> str:
        """What identifies the reading for de-duplication: source topic and reading id."""
        return f"{self.message.topic}\0{self.reading_id}"

    def identity(self) -> dict[str, Any]:
        return {
            "sensor": self.sensor,
            "reading_id": self.reading_id,
            "seq": self.seq,
            "timestamp": self.timestamp,
            "received_at": round(self.received_at, 6),
            "topic": self.message.topic,
        }


@dataclass(frozen=True)
class Outgoing:
    """A message for the outbox: topic, payload and what it is (result, error, correction)."""

    kind: str
    topic: str
    payload: bytes
    reading_id: str
    correlation: bytes | None = None


def result_message(
    reading: Reading,
    model: str,
    outputs: Mapping[str, np.ndarray],
    provenance: Provenance,
    model_version: str,
    *,
    device: str,
    correction: bool = False,
) -> Outgoing:
    """The result of one reading (``correction``: the cloud's later answer to a degraded one)."""
    kind = "correction" if correction else "result"
    return Outgoing(
        kind=kind,
        topic=reading.binding.results_topic(device, reading.sensor),
        payload=result_payload(model, model_version, outputs, provenance, reading.identity(), kind),
        reading_id=reading.reading_id,
        correlation=reading.message.correlation_data,
    )


def result_payload(
    model: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    provenance: Provenance,
    identity: dict[str, Any],
    kind: str,
) -> bytes:
    """A result message's bytes: the V2 response plus the reading's identity and ``kind``."""
    body, _ = build_response(
        model_name=model,
        model_version=model_version,
        outputs=outputs,
        request_id=str(identity["reading_id"]),
        parameters=provenance.parameters(),
    )
    body.update(identity, kind=kind)
    body["schema_version"] = RESULT_SCHEMA
    return orjson.dumps(body, option=_DUMPS)


def error_message(reading: Reading, exc: TetherError, *, device: str) -> Outgoing:
    """The error message of a reading that could not be answered."""
    body: dict[str, Any] = {
        "error": exc.message,
        "reason": exc.reason,
        "status": exc.status,
        "model": reading.binding.model,
        "kind": "error",
        **reading.identity(),
        "schema_version": RESULT_SCHEMA,
    }
    return Outgoing(
        kind="error",
        topic=reading.binding.errors_topic(device, reading.sensor),
        payload=orjson.dumps(body, option=_DUMPS),
        reading_id=reading.reading_id,
        correlation=reading.message.correlation_data,
    )


def last_resort_error(reading: Reading, exc: TetherError, *, device: str) -> Outgoing:
    """An error message built from plain strings only, for when :func:`error_message` failed."""
    body = {
        "error": str(exc.message)[:1000],
        "reason": str(exc.reason),
        "status": int(exc.status),
        "model": reading.binding.model,
        "kind": "error",
        "sensor": reading.sensor,
        "reading_id": reading.reading_id,
        "topic": reading.message.topic,
        "schema_version": RESULT_SCHEMA,
    }
    return Outgoing(
        kind="error",
        topic=reading.binding.errors_topic(device, reading.sensor),
        payload=orjson.dumps(body),
        reading_id=reading.reading_id,
        correlation=reading.message.correlation_data,
    )
