"""Sensor payloads -> a :class:`~shared.codec.DecodedRequest` and the fields that identify it.

A reading arrives in one of the formats of :data:`FORMATS` (docs/sensors.md, "Payloads"):

* ``json``: a V2 inference request (``{"inputs": [...]}``), decoded by the shared codec; a
  plain JSON array; or an object ``{"data": [...], "id": ..., "seq": ..., "timestamp": ...}``,
  shaped by the model's input metadata;
* ``raw``: little-endian bytes of the model input's datatype, shaped the same way; for a
  ``BYTES`` input, the payload is one element (a camera's JPEG or PNG frame, one row).

A binding's ``format = "auto"`` picks the format whose MQTT 5 content type the message
carries, else the first whose :attr:`PayloadFormat.sniff` recognises the payload, else
:data:`FALLBACK`. Adding a format is one entry in :data:`FORMATS` (and its name in
``edge.sensor_settings.PayloadFormatName``).

A flat array of ``k`` times one row's elements is ``k`` rows. Every failure is a
:class:`~shared.errors.TetherError` whose message names the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from edge.sensor_settings import PayloadFormatName
from edge.sensors.identity import Fields, add_parameters, fields_of
from serving.batching import batch_rows
from serving.runtimes.base import TensorSpec
from shared.codec import DecodedRequest, TensorLimits, decode_request_parts
from shared.datatypes import to_numpy_dtype
from shared.errors import InvalidInput, PayloadTooLarge, Unsupported
from shared.protocol import InferenceRequest


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
class DecodedReading:
    """A decoded payload: the request for the data plane and the fields it carried."""

    request: DecodedRequest
    fields: Fields = field(default_factory=Fields)

    @property
    def rows(self) -> int:
        return batch_rows(self.request.inputs)


Decoder = Callable[[bytes, ModelInputs, TensorLimits | None], DecodedReading]


@dataclass(frozen=True)
class PayloadFormat:
    """One way a reading can be sent: how ``auto`` recognises it and how it is decoded."""

    name: str
    #: MQTT 5 content types that select this format under ``auto``.
    content_types: frozenset[str]
    #: Whether a payload without a known content type looks like this format.
    sniff: Callable[[bytes], bool]
    decode: Decoder


def decode_payload(
    payload: bytes,
    model: ModelInputs,
    *,
    content_type: str | None = None,
    fmt: PayloadFormatName = "auto",
    max_bytes: int = 1024 * 1024,
    limits: TensorLimits | None = None,
) -> DecodedReading:
    """Decode one sensor payload for ``model``; raises a TetherError naming the reason."""
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes is over the limit of {max_bytes}")
    if not payload:
        raise InvalidInput("empty payload")
    return format_of(payload, content_type, fmt).decode(payload, model, limits)


def format_of(payload: bytes, content_type: str | None, fmt: PayloadFormatName) -> PayloadFormat:
    """The format a binding's ``format`` and the message's content type choose."""
    if fmt != "auto":
        return FORMATS[fmt]
    kind = (content_type or "").split(";")[0].strip().lower()
    for candidate in FORMATS.values():
        if kind in candidate.content_types:
            return candidate
    for candidate in FORMATS.values():
        if candidate.sniff(payload):
            return candidate
    return FORMATS[FALLBACK]


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
        return DecodedReading(request, add_parameters(fields, request.parameters))
    if "data" not in body:
        raise InvalidInput('a JSON object reading needs "data" (or "inputs" for a V2 request)')
    data = body["data"]
    if not isinstance(data, list):
        data = [data]
    return DecodedReading(_array_request(data, model), fields)


def _decode_raw(payload: bytes, model: ModelInputs, limits: TensorLimits | None) -> DecodedReading:
    return DecodedReading(_raw_request(payload, model))


def _looks_like_json(payload: bytes) -> bool:
    return payload.lstrip()[:1] in (b"{", b"[")


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


def model_inputs(inputs: Sequence[TensorSpec], max_batch_size: int) -> ModelInputs:
    return ModelInputs(tuple(inputs), max_batch_size)


#: The payload formats, by name, in the order ``auto`` sniffs them.
FORMATS: dict[str, PayloadFormat] = {
    "json": PayloadFormat(
        "json", frozenset({"application/json", "text/json"}), _looks_like_json, _decode_json
    ),
    # a tensor's bytes, or one encoded image for a model whose input is BYTES (a camera)
    "raw": PayloadFormat(
        "raw",
        frozenset({"application/octet-stream", "image/jpeg", "image/png"}),
        lambda payload: False,
        _decode_raw,
    ),
}
#: What ``auto`` decodes a payload as when neither content type nor sniffing decided.
FALLBACK = "raw"
