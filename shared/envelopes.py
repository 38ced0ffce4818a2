"""Versioned MQTT envelopes between edge and cloud.

An envelope is a JSON header, optionally followed by binary tensor data framed exactly
as in the HTTP binary extension. On the wire:

* a payload that starts with ``{`` is a plain JSON envelope;
* otherwise the first 4 bytes are the JSON header's length (big-endian), then the
  header, then the binary tail.

The inference request and response travel unchanged inside (``request`` / ``response``
hold the Open Inference Protocol header; tensors marked ``binary_data_size`` follow).
Every envelope carries ``schema_version``; readers accept any minor version of their
major, ignore unknown fields, and answer an unknown major with an :class:`ErrorEnvelope`.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Literal

import orjson
from pydantic import Field

from shared.errors import InvalidInput, TetherError
from shared.protocol import InferenceRequest, VersionedModel
from shared.versioning import SchemaVersion

ENVELOPE_SCHEMA = SchemaVersion(1, 1)
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024 * 1024


class Envelope(VersionedModel):
    """Base of the edge/cloud envelopes."""

    SCHEMA: ClassVar[SchemaVersion] = ENVELOPE_SCHEMA
    kind: str
    request_id: str = Field(min_length=1, max_length=200)


class InferRequestEnvelope(Envelope):
    """Edge -> cloud: run ``model`` on ``request`` before ``deadline`` (Unix seconds)."""

    kind: Literal["infer_request"] = "infer_request"
    model: str
    version: str | None = None
    deadline: float | None = Field(None, description="Unix time after which nobody waits.")
    sent_at: float | None = None
    trace_id: str | None = Field(None, description="Request id for logs along the whole path.")
    agent_version: str | None = Field(None, description="Since 1.1: the edge agent's version.")
    request: InferenceRequest


class InferResponseEnvelope(Envelope):
    """Cloud -> edge: the V2 response, with where and how long it took."""

    kind: Literal["infer_response"] = "infer_response"
    worker: str | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    worker_version: str | None = Field(None, description="Since 1.1: the cloud worker's version.")
    response: dict[str, Any]


class ErrorEnvelope(Envelope):
    """Cloud -> edge: the request failed; same ``error`` text as an HTTP error body."""

    kind: Literal["error"] = "error"
    status: int = 500
    reason: str = "internal"
    error: str

    @classmethod
    def from_error(cls, request_id: str, exc: TetherError) -> ErrorEnvelope:
        return cls(request_id=request_id, status=exc.status, reason=exc.reason, error=exc.message)


def frame(header: dict[str, Any], blobs: list[bytes] | None = None) -> bytes:
    """Header (+ binary tail) -> one MQTT payload."""
    encoded = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return encoded
    return _LENGTH.pack(len(encoded)) + encoded + b"".join(blobs)


def unframe(payload: bytes) -> tuple[dict[str, Any], memoryview]:
    """One MQTT payload -> parsed JSON header and the binary tail."""
    view = memoryview(payload)
    if payload[:1] == b"{":
        header_bytes, tail = payload, view[len(payload) :]
    else:
        if len(payload) < _LENGTH.size:
            raise InvalidInput("envelope too short for its header length")
        (length,) = _LENGTH.unpack_from(payload)
        if length > MAX_HEADER_BYTES or _LENGTH.size + length > len(payload):
            raise InvalidInput(f"envelope header length {length} runs past the payload")
        header_bytes = bytes(view[_LENGTH.size : _LENGTH.size + length])
        tail = view[_LENGTH.size + length :]
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"envelope header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("envelope header must be a JSON object")
    return header, tail


_KINDS: dict[str, type[Envelope]] = {
    "infer_request": InferRequestEnvelope,
    "infer_response": InferResponseEnvelope,
    "error": ErrorEnvelope,
}


def decode_envelope(payload: bytes) -> tuple[Envelope, memoryview]:
    """Decode any envelope; unknown kinds or majors raise :class:`InvalidInput` subclasses."""
    header, tail = unframe(payload)
    kind = header.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidInput(f"unknown envelope kind {kind!r}")
    return cls.parse(header), tail


def request_id_of(payload: bytes) -> str | None:
    """Best-effort request id of a payload that failed to decode (for the error reply)."""
    try:
        header, _ = unframe(payload)
    except TetherError:
        return None
    value = header.get("request_id")
    return value if isinstance(value, str) and value else None


#: Every envelope type, for JSON Schema generation.
ENVELOPE_TYPES: tuple[type[Envelope], ...] = (
    InferRequestEnvelope,
    InferResponseEnvelope,
    ErrorEnvelope,
)
