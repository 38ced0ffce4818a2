"""Tensor codecs: Open Inference Protocol JSON tensors and Triton's binary extension.

The same functions serve the HTTP API and the MQTT envelopes, so a tensor is framed the
same way on every transport. Decoding is symmetric with encoding:

* :func:`decode_request` turns a request body (JSON header, optionally followed by binary
  tensor data as Triton's binary tensor data extension lays it out) into numpy arrays;
* :func:`encode_response` turns numpy outputs into a body, binary where asked.

Binary layout: ``<JSON header><tensor 0 bytes><tensor 1 bytes>...``; the header length
travels out of band (HTTP header ``Inference-Header-Content-Length``); each binary tensor
says its byte size in ``parameters.binary_data_size``. ``BYTES`` elements are each
prefixed by a 4-byte little-endian length.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from shared.datatypes import from_numpy_dtype, to_numpy_dtype
from shared.errors import InvalidInput, PayloadTooLarge, Unsupported
from shared.json_request import (
    DeclaredInput,
    DeclaredRequest,
    json_tensor,
    read_request,
)
from shared.protocol import PROTOCOL_SCHEMA, InferenceRequest
from shared.signature import ModelSignature, check_inputs, takes_bytes

HEADER_LENGTH_HEADER = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


@dataclass(frozen=True)
class TensorLimits:
    """Bounds on what one request may carry."""

    max_elements: int = 16 * 1024 * 1024
    max_inputs: int = 64
    #: JSON objects a request may hold (inputs, outputs, parameters), unless the model takes
    #: BYTES (whose strings may hold braces): each becomes Python objects when decoded.
    max_objects: int = 4096


@dataclass(frozen=True)
class OutputRequest:
    """An output the client named, and whether it wants it as binary data."""

    name: str
    binary: bool | None = None


@dataclass
class DecodedRequest:
    """An inference request with its tensors as numpy arrays."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputRequest] | None = None

    @property
    def binary_output_default(self) -> bool:
        return bool(self.parameters.get("binary_data_output", False))


# --------------------------------------------------------------------------- decoding


def split_body(
    body: bytes | memoryview, header_length: int | None
) -> tuple[bytes | memoryview, memoryview]:
    """Split a body into its JSON header and the binary tail (views, not copies)."""
    if header_length is None:
        return body, memoryview(b"")
    if header_length < 0 or header_length > len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH_HEADER} is {header_length} but the body has {len(body)} bytes"
        )
    view = memoryview(body)
    return view[:header_length], view[header_length:]


def decode_request(
    body: bytes | memoryview,
    header_length: int | None = None,
    limits: TensorLimits | None = None,
    model: ModelSignature | None = None,
) -> DecodedRequest:
    """Decode an inference request body (JSON, or JSON header + binary tensors).

    With ``model``, what the request declares (input names, datatypes, shapes, batch) is
    checked against it before any tensor data is read, and ``BYTES`` data is taken only
    when the model has a ``BYTES`` input, so a request the model cannot take costs next to
    nothing to refuse. Binary tensors are views of ``body``, never copies.
    """
    limits = limits or TensorLimits()
    header, tail = split_body(body, header_length)
    request = read_request(
        header,
        max_objects=None if model is None or takes_bytes(model) else limits.max_objects,
    )
    return _decode(request, tail, limits, model)


def decode_request_parts(
    request: InferenceRequest,
    tail: memoryview | bytes,
    limits: TensorLimits | None = None,
    model: ModelSignature | None = None,
) -> DecodedRequest:
    """Decode a parsed request header plus the binary data that followed it (MQTT
    envelopes, sensor readings); ``model`` as in :func:`decode_request`."""
    declared = DeclaredRequest(
        inputs=[
            DeclaredInput(i.name, i.shape, i.datatype, dict(i.parameters or {}), i.data)
            for i in request.inputs
        ],
        id=request.id,
        parameters=dict(request.parameters or {}),
        outputs=None
        if request.outputs is None
        else [(o.name, dict(o.parameters or {})) for o in request.outputs],
    )
    return _decode(declared, memoryview(tail), limits or TensorLimits(), model)


def _decode(
    request: DeclaredRequest,
    tail: memoryview,
    limits: TensorLimits,
    model: ModelSignature | None,
) -> DecodedRequest:
    if len(request.inputs) > limits.max_inputs:
        raise InvalidInput(f"too many inputs: {len(request.inputs)} > {limits.max_inputs}")
    counts: dict[str, int] = {}
    for spec in request.inputs:
        if spec.name in counts:
            raise InvalidInput(f"input {spec.name!r} appears twice")
        counts[spec.name] = _element_count(spec.name, spec.shape, limits)
        to_numpy_dtype(spec.datatype)  # unknown datatypes first, whatever the model
        if "shared_memory_region" in spec.parameters:
            raise Unsupported("the shared-memory extension is not supported; send tensor data")
    if model is not None:
        check_inputs(
            model,
            {spec.name: spec.datatype for spec in request.inputs},
            {spec.name: spec.shape for spec in request.inputs},
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for spec in request.inputs:
        count = counts[spec.name]
        dtype = to_numpy_dtype(spec.datatype)
        size = spec.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input {spec.name!r}: binary_data_size must be an integer")
            if offset + size > len(tail):
                raise InvalidInput(
                    f"input {spec.name!r}: binary_data_size {size} runs past the body "
                    f"({len(tail) - offset} bytes left)"
                )
            chunk = tail[offset : offset + size]
            offset += size
            array = _from_binary(spec.name, spec.shape, spec.datatype, dtype, count, chunk)
        else:
            if spec.data is None:
                raise InvalidInput(f"input {spec.name!r} has neither data nor binary_data_size")
            array = json_tensor(spec, dtype, count)
        inputs[spec.name] = array.reshape(spec.shape)
        datatypes[spec.name] = spec.datatype
    if offset != len(tail):
        raise InvalidInput(f"{len(tail) - offset} bytes of binary data belong to no input")
    outputs = None
    if request.outputs is not None:
        outputs = [
            OutputRequest(name, _binary_flag(params.get("binary_data")))
            for name, params in request.outputs
        ]
        if any("classification" in params for _name, params in request.outputs):
            raise Unsupported("the classification extension is not supported")
    return DecodedRequest(
        inputs=inputs,
        datatypes=datatypes,
        id=request.id,
        parameters=request.parameters,
        outputs=outputs,
    )


def _binary_flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidInput("parameters.binary_data must be true or false")


#: Most dimensions of a tensor (numpy's own bound is 32 or 64, depending on its version).
MAX_DIMENSIONS = 32


def _element_count(name: str, shape: Sequence[int], limits: TensorLimits) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(f"input {name!r}: {len(shape)} dimensions is over {MAX_DIMENSIONS}")
    if any(d > limits.max_elements for d in shape):
        # even with another dimension 0 (no elements): numpy cannot shape an array so
        # large, and no model takes one
        raise PayloadTooLarge(
            f"input {name!r}: dimension of shape {list(shape)} is over the limit of "
            f"{limits.max_elements} elements"
        )
    count = math.prod(shape)
    if count > limits.max_elements:
        raise PayloadTooLarge(
            f"input {name!r}: {count} elements is over the limit of {limits.max_elements}"
        )
    return count


def _from_binary(
    name: str, shape: Sequence[int], datatype: str, dtype: np.dtype, count: int, chunk: memoryview
) -> np.ndarray:
    if datatype == "BYTES":
        found = count_bytes_elements(chunk)
        if found != count:
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} needs {count} elements, binary data has "
                f"{found}"
            )
        return deserialize_bytes(chunk)
    expected = count * dtype.itemsize
    if len(chunk) != expected:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} of {datatype} needs {expected} bytes, "
            f"binary_data_size is {len(chunk)}"
        )
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def serialize_bytes(array: np.ndarray) -> bytes:
    """BYTES tensor -> length-prefixed elements (4-byte little-endian length each)."""
    parts = []
    for item in array.ravel():
        raw = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def count_bytes_elements(buffer: memoryview | bytes) -> int:
    """How many length-prefixed elements ``buffer`` holds (:class:`InvalidInput` if the
    prefixes do not tile it), found without making them."""
    view = memoryview(buffer)
    found = offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput("BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4 + length
        if offset > len(view):
            raise InvalidInput("BYTES element length runs past the data")
        found += 1
    return found


def deserialize_bytes(buffer: memoryview | bytes) -> np.ndarray:
    """Length-prefixed elements -> BYTES tensor (a flat object array of ``bytes``)."""
    view = memoryview(buffer)
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InvalidInput("BYTES data ends inside an element's length prefix")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput("BYTES element length runs past the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


# --------------------------------------------------------------------------- encoding


def tensor_bytes(array: np.ndarray, datatype: str) -> bytes:
    """A tensor's raw binary-extension bytes (little-endian, row-major)."""
    if datatype == "BYTES":
        return serialize_bytes(array)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def json_data(array: np.ndarray, datatype: str) -> Any:
    """A tensor's data as JSON-ready flat row-major data."""
    if datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in array.ravel()
        ]
    return np.ascontiguousarray(array).ravel()


def build_response(
    *,
    model_name: str,
    model_version: str | None,
    outputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str] | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    requested: Sequence[OutputRequest] | None = None,
    binary_default: bool = False,
) -> tuple[dict[str, Any], list[bytes]]:
    """An inference response as its JSON header (a dict) and its binary blobs, in order."""
    names = [r.name for r in requested] if requested else list(outputs)
    wanted_binary = {r.name: r.binary for r in requested or ()}
    header_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in names:
        binary = wanted_binary.get(name)
        header_outputs.append(
            _tensor_entry(
                name,
                outputs[name],
                datatypes,
                binary_default if binary is None else binary,
                blobs,
            )
        )
    body: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        body["model_version"] = model_version
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = dict(parameters)
    body["outputs"] = header_outputs
    body["schema_version"] = str(PROTOCOL_SCHEMA)
    return body, blobs


def _tensor_entry(
    name: str,
    array: np.ndarray,
    datatypes: Mapping[str, str] | None,
    binary: bool,
    blobs: list[bytes],
) -> dict[str, Any]:
    """One tensor of a request or response header; binary data is appended to ``blobs``."""
    datatype = (datatypes or {}).get(name) or from_numpy_dtype(array.dtype)
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    if binary:
        blob = tensor_bytes(array, datatype)
        entry["parameters"] = {"binary_data_size": len(blob)}
        blobs.append(blob)
    else:
        entry["data"] = json_data(array, datatype)
    return entry


def encode_response(**kwargs: Any) -> tuple[bytes, int | None]:
    """Encode an inference response (see :func:`build_response` for the arguments).

    Returns the body and the JSON header length, which is ``None`` when every output is
    JSON (a plain JSON body).
    """
    header, blobs = build_response(**kwargs)
    return join_parts(header, blobs)


def build_request(
    inputs: Mapping[str, np.ndarray],
    datatypes: Mapping[str, str] | None = None,
    *,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[OutputRequest] | None = None,
    binary: bool = True,
) -> tuple[dict[str, Any], list[bytes]]:
    """An inference request (the client side) as its JSON header and binary blobs."""
    header_inputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array in inputs.items():
        header_inputs.append(_tensor_entry(name, array, datatypes, binary, blobs))
    body: dict[str, Any] = {"inputs": header_inputs}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = dict(parameters)
    if outputs:
        body["outputs"] = [
            {"name": o.name, **({"parameters": {"binary_data": o.binary}} if o.binary else {})}
            for o in outputs
        ]
    return body, blobs


def encode_request(
    inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str] | None = None, **kwargs: Any
) -> tuple[bytes, int | None]:
    """Encode an inference request body (see :func:`build_request`)."""
    header, blobs = build_request(inputs, datatypes, **kwargs)
    return join_parts(header, blobs)


def join_parts(header: dict[str, Any], blobs: Sequence[bytes]) -> tuple[bytes, int | None]:
    """JSON header + blobs -> body and header length (``None`` for a plain JSON body)."""
    encoded = orjson.dumps(header, option=_JSON_OPTIONS)
    if not blobs:
        return encoded, None
    return encoded + b"".join(blobs), len(encoded)


def decode_response(body: bytes | memoryview, header_length: int | None = None) -> dict[str, Any]:
    """Decode a response body into its JSON header with outputs' ``data`` as numpy arrays."""
    header, tail = split_body(body, header_length)
    try:
        parsed = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"malformed JSON response: {exc}") from None
    return decode_response_parts(parsed, tail)


def decode_response_parts(parsed: Any, tail: memoryview | bytes) -> dict[str, Any]:
    """Fill a parsed response header's outputs with numpy arrays from JSON data or ``tail``."""
    tail = memoryview(tail)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("outputs"), list):
        raise InvalidInput("response has no outputs list")
    offset = 0
    for out in parsed["outputs"]:
        if not isinstance(out, dict):
            raise InvalidInput("response output must be an object")
        try:
            datatype = str(out["datatype"])
            shape = [int(d) for d in out["shape"]]
        except (KeyError, TypeError, ValueError):
            raise InvalidInput("response output lacks datatype or shape") from None
        dtype = to_numpy_dtype(datatype)
        size = (out.get("parameters") or {}).get("binary_data_size")
        name = str(out.get("name"))
        count = _element_count(name, shape, TensorLimits())
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InvalidInput("response binary_data_size runs past the body")
            array = _from_binary(name, shape, datatype, dtype, count, tail[offset : offset + size])
            offset += size
        else:
            array = json_tensor(
                DeclaredInput(name, shape, datatype, data=out.get("data")), dtype, count
            )
        out["data"] = array.reshape(shape)
    return parsed
