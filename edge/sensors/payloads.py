"""Sensor payloads -> a :class:`~shared.codec.DecodedRequest` and the reading's identity.

A reading arrives in one of three shapes (docs/sensors.md):

* a V2 inference request (``{"inputs": [...]}``), decoded by the shared codec;
* a plain JSON array, or an object ``{"data": [...], "id": ..., "seq": ..., "timestamp": ...}``,
  shaped by the model's input metadata;
* raw little-endian bytes of the model input's datatype, shaped the same way.

A flat array of ``k`` times one row's elements is ``k`` rows. Every failure is a
:class:`~shared.errors.TetherError` whose message names the reason.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edge.runtimes.base import TensorSpec
from edge.sensors.settings import PayloadFormat
from shared.codec import DecodedRequest, TensorLimits, decode_request_parts
from shared.datatypes import to_numpy_dtype
from shared.errors import InvalidInput, PayloadTooLarge, Unsupported
from shared.mqtt import Message
from shared.protocol import InferenceRequest

JSON_TYPES = frozenset({"application/json", "text/json"})
#: Raw payloads: a tensor's bytes, or one encoded image for a model with an image pipeline.
RAW_TYPES = frozenset({"application/octet-stream", "image/jpeg", "image/png"})
_ID_KEYS = ("id", "reading_id")
_TIME_KEYS = ("timestamp", "ts", "time")


@dataclass(frozen=True)
class ModelInputs:
    """What the bridge needs of a model to shape readings: its inputs and batching."""

    inputs: tuple[TensorSpec, ...]
    max_batch_size: int

    @property
    def batched(self) -> bool:
        """True when the first dimension of every input is the batch."""
        return self.max_batch_size > 0


@dataclass
class Fields:
    """The identity fields a payload carried (``id``, ``seq``, ``timestamp``)."""

    id: str | None = None
    seq: Any = None
    timestamp: Any = None


@dataclass
class DecodedReading:
    """A decoded payload: the request for the data plane and the fields it carried."""

    request: DecodedRequest
    fields: Fields = field(default_factory=Fields)

    @property
    def rows(self) -> int:
        for array in self.request.inputs.values():
            return int(array.shape[0]) if array.ndim else 1
        return 0


def decode_payload(
    payload: bytes,
    model: ModelInputs,
    *,
    content_type: str | None = None,
    fmt: PayloadFormat = "auto",
    max_bytes: int = 1024 * 1024,
    limits: TensorLimits | None = None,
) -> DecodedReading:
    """Decode one sensor payload for ``model``; raises a TetherError naming the reason."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes is over the limit of {max_bytes}")
    if not payload:
        raise InvalidInput("empty payload")
    if _is_json(payload, content_type, fmt):
        return _decode_json(payload, model, limits)
    return DecodedReading(_raw_request(payload, model))


def _is_json(payload: bytes, content_type: str | None, fmt: PayloadFormat) -> bool:
    if fmt != "auto":
        return fmt == "json"
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        return True
    if kind in RAW_TYPES:
        return False
    return payload.lstrip()[:1] in (b"{", b"[")


def _decode_json(payload: bytes, model: ModelInputs, limits: TensorLimits | None) -> DecodedReading:
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    if isinstance(body, list):
        return DecodedReading(_array_request(body, model))
    if not isinstance(body, dict):
        raise InvalidInput('a JSON reading must be an array, {"data": [...]} or a V2 request')
    fields = fields_of(body)
    if "inputs" in body:
        request = decode_request_parts(InferenceRequest.parse(body), b"", limits)
        params = request.parameters
        if fields.timestamp is None:
            fields.timestamp = next((params[k] for k in _TIME_KEYS if k in params), None)
        if fields.seq is None:
            fields.seq = params.get("seq")
        return DecodedReading(request, fields)
    if "data" not in body:
        raise InvalidInput('a JSON object reading needs "data" (or "inputs" for a V2 request)')
    data = body["data"]
    if not isinstance(data, list):
        data = [data]
    return DecodedReading(_array_request(data, model), fields)


def fields_of(body: dict[str, Any]) -> Fields:
    """The identity fields of a JSON object reading."""
    ident = next((body[k] for k in _ID_KEYS if body.get(k) is not None), None)
    return Fields(
        id=str(ident) if ident is not None else None,
        seq=body.get("seq"),
        timestamp=next((body[k] for k in _TIME_KEYS if k in body), None),
    )


def _single_input(model: ModelInputs) -> TensorSpec:
    if len(model.inputs) != 1:
        names = ", ".join(spec.name for spec in model.inputs)
        raise InvalidInput(
            f"the model takes {len(model.inputs)} inputs ({names}); send a V2 inference request"
        )
    return model.inputs[0]


def _row_shape(spec: TensorSpec, model: ModelInputs) -> tuple[int, ...]:
    dims = spec.shape[1:] if model.batched else spec.shape
    if any(d < 0 for d in dims):
        raise Unsupported(
            f"input {spec.name!r} has dynamic dimensions {list(spec.shape)}; send a V2 request"
        )
    return tuple(dims)


def _shape(spec: TensorSpec, model: ModelInputs, count: int) -> tuple[int, ...]:
    row = _row_shape(spec, model)
    per_row = math.prod(row)
    if not model.batched:
        if count != per_row:
            raise InvalidInput(
                f"input {spec.name!r} needs {per_row} values (shape {list(row)}), got {count}"
            )
        return row
    if count == 0 or per_row == 0 or count % per_row:
        raise InvalidInput(
            f"input {spec.name!r} needs a multiple of {per_row} values (rows of shape "
            f"{list(row)}), got {count}"
        )
    return (count // per_row, *row)


def _array_request(data: list[Any], model: ModelInputs) -> DecodedRequest:
    spec = _single_input(model)
    dtype = to_numpy_dtype(spec.datatype)
    if spec.datatype == "BYTES":
        raise Unsupported("BYTES inputs need a V2 request")
    try:
        values = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"data is not a rectangular array of numbers: {exc}") from None
    if values.dtype.kind not in "biuf":
        raise InvalidInput(f"data must be numbers, got {values.dtype.kind!r} values")
    if dtype.kind in "iub" and values.dtype.kind == "f":
        raise InvalidInput(f"input {spec.name!r} is {spec.datatype}: data must be integers")
    try:
        flat = values.astype(dtype).ravel()
    except (ValueError, OverflowError) as exc:
        raise InvalidInput(f"data does not fit {spec.datatype}: {exc}") from None
    array = flat.reshape(_shape(spec, model, flat.size))
    return DecodedRequest(inputs={spec.name: array}, datatypes={spec.name: spec.datatype})


def _raw_request(payload: bytes, model: ModelInputs) -> DecodedRequest:
    spec = _single_input(model)
    if spec.datatype == "BYTES":
        return _one_element(payload, spec, model)
    dtype = to_numpy_dtype(spec.datatype)
    if len(payload) % dtype.itemsize:
        raise InvalidInput(
            f"raw payload of {len(payload)} bytes is not whole {spec.datatype} values "
            f"({dtype.itemsize} bytes each)"
        )
    flat = np.frombuffer(payload, dtype=dtype.newbyteorder("<")).astype(dtype)
    return DecodedRequest(
        inputs={spec.name: flat.reshape(_shape(spec, model, flat.size))},
        datatypes={spec.name: spec.datatype},
    )


def _one_element(payload: bytes, spec: TensorSpec, model: ModelInputs) -> DecodedRequest:
    """A raw payload for a ``BYTES`` input is one element: a camera's JPEG frame, one row."""
    row = _row_shape(spec, model)
    if math.prod(row) != 1:
        raise Unsupported(
            f"input {spec.name!r} takes {list(spec.shape)} BYTES elements; send a V2 request"
        )
    array = np.empty((1, *row) if model.batched else row, dtype=object)
    array.flat[0] = payload
    return DecodedRequest(inputs={spec.name: array}, datatypes={spec.name: "BYTES"})


# --------------------------------------------------------------------------- identity


def reading_id(message: Message, fields: Fields | None) -> tuple[str, str]:
    """The reading id and where it came from (docs/sensors.md, "Reading ids").

    In order: the payload's ``id`` (or the V2 request id), its ``seq``; the MQTT 5 user
    property ``id``/``reading_id``/``seq``; the correlation data; else a hash of topic and
    payload (``h:`` + 24 hex digits).
    """
    if fields is not None and fields.id:
        return fields.id, "payload"
    if fields is not None and fields.seq is not None:
        return str(fields.seq), "seq"
    props = message.user_properties
    for key in ("id", "reading_id", "seq"):
        if props.get(key):
            return props[key], "property"
    if message.correlation_data:
        try:
            return message.correlation_data.decode("utf-8"), "correlation"
        except UnicodeDecodeError:
            return message.correlation_data.hex(), "correlation"
    digest = hashlib.sha256(message.topic.encode() + b"\0" + message.payload).hexdigest()
    return f"h:{digest[:24]}", "hash"


def best_effort_fields(message: Message) -> Fields | None:
    """The identity fields of a payload that failed to decode, when it is a JSON object."""
    if message.payload.lstrip()[:1] != b"{" or len(message.payload) > 1024 * 1024:
        return None
    try:
        body = orjson.loads(message.payload)
    except orjson.JSONDecodeError:
        return None
    return fields_of(body) if isinstance(body, dict) else None


def message_timestamp(message: Message, fields: Fields | None) -> Any:
    """The source's timestamp: the payload's, else the ``timestamp``/``ts`` user property."""
    if fields is not None and fields.timestamp is not None:
        return fields.timestamp
    props = message.user_properties
    return next((props[k] for k in _TIME_KEYS if k in props), None)


def model_inputs(inputs: Sequence[TensorSpec], max_batch_size: int) -> ModelInputs:
    return ModelInputs(tuple(inputs), max_batch_size)
