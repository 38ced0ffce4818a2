"""Versioned MQTT envelopes between edge and cloud.

An envelope is a JSON header, optionally followed by binary tensor data framed exactly
as in the HTTP binary extension. On the wire:

* a payload that starts with ``{`` is a plain JSON envelope;
* otherwise the first 4 bytes are the JSON header's length (big-endian), then the
  header, then the binary tail.

The inference request and response travel unchanged inside (``request`` / ``response``
hold the Open Inference Protocol header; tensors marked ``binary_data_size`` follow).
Text requests (chat, completion, embeddings: ``docs/openai.md``) travel on the same request
topic as a :class:`TextRequestEnvelope`; a generation comes back as ordered
:class:`TextChunkEnvelope` messages (``seq`` 0, 1, 2, ...; the last one ``final`` with the
finish reason and usage), embeddings as one :class:`EmbedResponseEnvelope` whose binary
tail holds the vectors.
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
#: The text envelopes' own version (they were added at 1.0, after the tensor ones).
TEXT_SCHEMA = SchemaVersion(1, 0)
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


class TextMessage(VersionedModel):
    """One message of a chat conversation."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    role: str = Field(max_length=64)
    content: str


class GenerationParams(VersionedModel):
    """What to generate and how (chat ``messages`` or a plain ``prompt``)."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    messages: list[TextMessage] | None = None
    prompt: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)


class TextRequestEnvelope(Envelope):
    """Edge -> cloud: generate text (``generation``) or embed ``texts`` with ``model``,
    starting before ``deadline`` (Unix seconds)."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    kind: Literal["text_request"] = "text_request"
    model: str
    task: Literal["generate", "embed"]
    deadline: float | None = Field(None, description="Unix time after which nobody waits.")
    sent_at: float | None = None
    trace_id: str | None = Field(None, description="Request id for logs along the whole path.")
    agent_version: str | None = None
    generation: GenerationParams | None = Field(None, description="task generate: what to write.")
    texts: list[str] | None = Field(None, description="task embed: the texts, in order.")


class TextCancelEnvelope(Envelope):
    """Edge -> cloud: stop the generation ``request_id`` (its client went away, or the device
    gave up on the stream); nothing is answered."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    kind: Literal["text_cancel"] = "text_cancel"
    model: str


class TextUsage(VersionedModel):
    """Tokens read and written by one generation."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)


class TextChunkEnvelope(Envelope):
    """Cloud -> edge: one piece of a generation, in order by ``seq`` (from 0, no gaps).

    Chunk 0 is sent when the generation starts; the ``final`` chunk carries the finish
    reason and usage and ends the stream. A failure after chunk 0 ends the stream with an
    :class:`ErrorEnvelope` instead.
    """

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    kind: Literal["text_chunk"] = "text_chunk"
    seq: int = Field(ge=0)
    text: str = ""
    final: bool = False
    finish_reason: Literal["stop", "length"] | None = None
    usage: TextUsage | None = None
    worker: str | None = None
    model_version: str | None = None
    queue_ms: float | None = None


class EmbedResponseEnvelope(Envelope):
    """Cloud -> edge: ``count`` embeddings of ``dimension`` floats, in the binary tail as
    little-endian float32, row-major (one row per text, in the request's order)."""

    SCHEMA: ClassVar[SchemaVersion] = TEXT_SCHEMA
    kind: Literal["embed_response"] = "embed_response"
    count: int = Field(ge=0)
    dimension: int = Field(ge=0)
    prompt_tokens: int = Field(ge=0)
    worker: str | None = None
    model_version: str | None = None
    queue_ms: float | None = None
    compute_ms: float | None = None


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
    "text_request": TextRequestEnvelope,
    "text_chunk": TextChunkEnvelope,
    "text_cancel": TextCancelEnvelope,
    "embed_response": EmbedResponseEnvelope,
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
    TextRequestEnvelope,
    TextChunkEnvelope,
    TextCancelEnvelope,
    EmbedResponseEnvelope,
)
