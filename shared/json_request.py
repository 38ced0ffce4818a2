"""Reading an inference request's JSON with memory bounded by what the model takes.

msgspec decodes the request into a few small typed objects and leaves each input's
``data``, and every ``parameters`` object, as raw JSON text: a view into the body, not
Python objects. The codec checks what the request declared (names, datatypes, shapes)
against the model first; then :func:`json_tensor` turns numeric text into a numpy array
of the declared size 64 KiB of text at a time, so the tensor is the only large
allocation. Python objects per element are made only for small data,
booleans and strings (``BYTES``, which only a model with a ``BYTES`` input is sent).

Two bounds keep a hostile header from costing several times its body:

* a request may hold at most ``max_objects`` JSON objects (inputs, outputs, parameters:
  the things decoding makes Python objects of), counted before decoding;
* ``shape`` and ``parameters`` are decoded only when small enough to be real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import numpy as np
import orjson

from shared.errors import InvalidInput, PayloadTooLarge
from shared.protocol import PROTOCOL_SCHEMA
from shared.versioning import check_readable

#: Largest ``parameters`` object read (of the request, an input or an output).
MAX_PARAMETERS_BYTES: Final = 64 * 1024
#: Largest ``shape`` text read: more than enough for the most dimensions numpy allows.
MAX_SHAPE_BYTES: Final = 32 * 24
#: Numeric text larger than this is parsed piece by piece without Python objects.
SMALL_DATA_BYTES: Final = 4096
#: The size of one piece of numeric text turned into numbers at a time.
PIECE_BYTES: Final = 64 * 1024

_ABSENT: Final = msgspec.Raw(b"")
_BRACKETS_TO_SPACES: Final = bytes.maketrans(b"[]", b"  ")
_NOT_SKELETON: Final = b"0123456789.eE+- \t\r\n"


class _Output(msgspec.Struct):
    name: str
    parameters: msgspec.Raw = _ABSENT


class _Input(msgspec.Struct):
    name: str
    shape: msgspec.Raw
    datatype: str
    parameters: msgspec.Raw = _ABSENT
    data: msgspec.Raw = _ABSENT


class _Request(msgspec.Struct):
    inputs: list[_Input]
    id: str | None = None
    parameters: msgspec.Raw = _ABSENT
    outputs: list[_Output] | None = None
    schema_version: str | None = None


class _Version(msgspec.Struct):
    schema_version: Any = None


_REQUEST = msgspec.json.Decoder(_Request, strict=False)
_VERSION = msgspec.json.Decoder(_Version)
_SHAPE = msgspec.json.Decoder(list[int], strict=False)
_PARAMETERS = msgspec.json.Decoder(dict[str, Any] | None)
_ANY = msgspec.json.Decoder()


@dataclass
class DeclaredInput:
    """One input as a request declared it; ``data`` is still raw JSON (``msgspec.Raw``),
    an already parsed value (MQTT envelopes), or ``None``."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = field(default_factory=dict)
    data: Any = None


@dataclass
class DeclaredRequest:
    """An inference request's header, tensors not yet decoded."""

    inputs: list[DeclaredInput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    #: The outputs asked for: name and parameters.
    outputs: list[tuple[str, dict[str, Any]]] | None = None


def read_request(header: bytes | memoryview, *, max_objects: int | None) -> DeclaredRequest:
    """Parse a request's JSON (the whole body, or the binary extension's header) without
    turning tensor data into Python objects; :class:`InvalidInput` if it is malformed.

    ``max_objects`` bounds the JSON objects (``None``: not counted, for a model that takes
    ``BYTES``, whose strings may hold braces)."""
    if max_objects is not None and len(header) > 2 * max_objects:  # "{}" is 2 bytes
        objects = header.count(b"{") if isinstance(header, bytes) else _count(header, b"{")
        if objects > max_objects:
            raise PayloadTooLarge(
                f"the request holds {objects} JSON objects, over the limit of {max_objects}"
            )
    try:
        raw = _REQUEST.decode(header)
    except msgspec.ValidationError as exc:
        _check_version_first(header)
        raise InvalidInput(f"invalid InferenceRequest: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("malformed JSON: nested too deeply") from None
    check_readable(raw.schema_version, PROTOCOL_SCHEMA, "InferenceRequest")
    outputs = None
    if raw.outputs is not None:
        outputs = [(o.name, _parameters(o.parameters, f"output {o.name!r}")) for o in raw.outputs]
    return DeclaredRequest(
        inputs=[
            DeclaredInput(
                name=i.name,
                shape=_shape(i.shape, i.name),
                datatype=i.datatype,
                parameters=_parameters(i.parameters, f"input {i.name!r}"),
                data=i.data if len(i.data) else None,
            )
            for i in raw.inputs
        ],
        id=raw.id,
        parameters=_parameters(raw.parameters, "the request"),
        outputs=outputs,
    )


def _check_version_first(header: bytes | memoryview) -> None:
    """An unknown major version is the error to report, whatever else is wrong."""
    try:
        version = _VERSION.decode(header).schema_version
    except msgspec.ValidationError:
        raise InvalidInput("InferenceRequest must be a JSON object") from None
    except (msgspec.DecodeError, RecursionError):
        return
    check_readable(version, PROTOCOL_SCHEMA, "InferenceRequest")


def _shape(raw: msgspec.Raw, name: str) -> list[int]:
    if len(raw) > MAX_SHAPE_BYTES:
        raise InvalidInput(f"input {name!r}: shape has too many dimensions")
    try:
        return _SHAPE.decode(raw)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid InferenceRequest: input {name!r} shape: {exc}") from None


def _parameters(raw: msgspec.Raw, owner: str) -> dict[str, Any]:
    if not len(raw):
        return {}
    if len(raw) > MAX_PARAMETERS_BYTES:
        raise InvalidInput(f"parameters of {owner} are over {MAX_PARAMETERS_BYTES} bytes")
    try:
        return _PARAMETERS.decode(raw) or {}
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"parameters of {owner} must be a JSON object: {exc}") from None
    except RecursionError:
        raise InvalidInput(f"parameters of {owner} are nested too deeply") from None


# --------------------------------------------------------------------------- tensor data


def json_tensor(spec: DeclaredInput, dtype: np.dtype, count: int) -> np.ndarray:
    """An input's JSON ``data`` as a flat array of ``count`` elements of ``dtype`` (the
    count the model accepted). Data must be flat or nested exactly as the shape says (the
    two V2 forms). Large data costs its array and 64 KiB pieces of text, never Python
    objects for more elements than ``count``."""
    data = spec.data
    if isinstance(data, msgspec.Raw):
        if len(data) > SMALL_DATA_BYTES:
            view = memoryview(data)
            if count == 0:
                raise _wrong_count(spec, count, None)
            if spec.datatype not in ("BOOL", "BYTES"):
                return _parse_numbers(spec, view, dtype, count)
            if spec.datatype == "BOOL" and _count(view, b",") != count - 1:
                raise _wrong_count(spec, count, None)  # before one object per element is made
        try:
            data = _ANY.decode(data)
        except msgspec.ValidationError as exc:  # a number past a double, say
            raise InvalidInput(
                f"input {spec.name!r}: data does not fit datatype {spec.datatype}: {exc}"
            ) from None
        except RecursionError:
            raise InvalidInput(f"input {spec.name!r}: data is nested too deeply") from None
    return _from_values(spec, data, dtype, count)


def _parse_numbers(
    spec: DeclaredInput, view: memoryview, dtype: np.dtype, count: int
) -> np.ndarray:
    """Numeric JSON text -> a flat array of ``count`` elements, a piece at a time: each
    piece of text becomes a list of numbers (orjson) and goes straight into the array, so
    no more than a piece's numbers are Python objects at once."""
    integer = dtype.kind in "iu"
    expected = _skeleton(spec.shape) if _nested(view) else None
    out = np.empty(count, dtype=dtype)
    filled = skeleton_at = 0
    position, total = 0, len(view)
    while position < total:
        end = min(position + PIECE_BYTES, total)
        piece = view[position:end].tobytes()
        step = len(piece)
        cut_here = end < total
        if cut_here:  # end the piece between two numbers
            cut = piece.rfind(b",")
            if cut < 0:
                raise InvalidInput(f"input {spec.name!r}: a number over {PIECE_BYTES} bytes long")
            piece, step = piece[:cut], cut + 1
        if integer and (b"." in piece or b"e" in piece or b"E" in piece):
            raise _fractions(spec)  # numpy would cut 1.5 to 1
        if expected is not None:
            # without numbers and spaces the piece must be the shape's brackets and commas
            layout = piece.translate(None, _NOT_SKELETON) + (b"," if cut_here else b"")
            if expected[skeleton_at : skeleton_at + len(layout)] != layout:
                raise _misshapen(spec)
            skeleton_at += len(layout)
            text = b"[" + piece.translate(_BRACKETS_TO_SPACES) + b"]"
        else:
            # flat: the data's own brackets open the first piece and close the last, and
            # there are no others
            first, last = position == 0, not cut_here
            inner = (1 if first else 0, len(piece) - (1 if last else 0))
            if (
                (first and piece[:1] != b"[")
                or piece.find(b"[", *inner) >= 0
                or piece.find(b"]", *inner) >= 0
            ):
                raise _misshapen(spec)
            text = (b"" if first else b"[") + piece + (b"" if last else b"]")
        try:
            values = orjson.loads(text)  # the fastest float parser here
            if filled + len(values) > count:
                raise _wrong_count(spec, count, None)
            out[filled : filled + len(values)] = values
        except (orjson.JSONDecodeError, ValueError, TypeError, OverflowError) as exc:
            # not numbers (strings, objects), past a double, or past the datatype
            raise InvalidInput(
                f"input {spec.name!r}: data does not fit datatype {spec.datatype}: {exc}"
            ) from None
        filled += len(values)
        position += step
    if expected is not None and skeleton_at != len(expected):
        raise _misshapen(spec)
    if filled != count:
        raise _wrong_count(spec, count, filled)
    return out


def _count(view: memoryview, what: bytes) -> int:
    """Occurrences of ``what`` (one byte) in ``view``, a piece at a time."""
    return sum(
        view[at : at + PIECE_BYTES].tobytes().count(what) for at in range(0, len(view), PIECE_BYTES)
    )


def _nested(view: memoryview) -> bool:
    """True when the array's first element (after spaces) is an array."""
    return view[:1] == b"[" and view[1:65].tobytes().lstrip()[:1] == b"["


def _skeleton(shape: list[int]) -> bytes:
    """Brackets and commas of data nested exactly as ``shape`` (numbers and spaces left out)."""
    if not shape:
        return b"[]"
    inner = b"," * max(0, shape[-1] - 1)
    level = b"[" + inner + b"]"
    for size in reversed(shape[:-1]):
        level = b"[" + b",".join([level] * size) + b"]"
    return level


def _from_values(spec: DeclaredInput, data: Any, dtype: np.dtype, count: int) -> np.ndarray:
    """Parsed JSON values -> a flat array (small data, booleans, strings, big integers)."""
    if not isinstance(data, list):
        data = [data]
    try:
        if spec.datatype == "BYTES":
            flat = np.asarray(data, dtype=object).ravel()
            array = np.empty(flat.shape, dtype=object)
            for i, item in enumerate(flat):
                if not isinstance(item, str):
                    raise InvalidInput(f"input {spec.name!r}: BYTES data must be strings")
                array[i] = item.encode()
        else:
            array = np.asarray(data, dtype=dtype)
            if dtype.kind in "iub" and _any_float(data):  # numpy would cut 1.5 to 1
                raise _fractions(spec)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(
            f"input {spec.name!r}: data does not fit datatype {spec.datatype}: {exc}"
        ) from None
    if array.size != count:
        raise _wrong_count(spec, count, array.size)
    if array.ndim > 1 and list(array.shape) != list(spec.shape):
        raise _misshapen(spec)
    return array.ravel()


def _any_float(data: list[Any]) -> bool:
    """True when nested lists hold a float anywhere."""
    stack = [data]
    while stack:
        for item in stack.pop():
            if isinstance(item, float):
                return True
            if isinstance(item, list):
                stack.append(item)
    return False


def _fractions(spec: DeclaredInput) -> InvalidInput:
    kind = "booleans" if spec.datatype == "BOOL" else "integers"
    return InvalidInput(
        f"input {spec.name!r}: {spec.datatype} data must be {kind}, got numbers with fractions"
    )


def _wrong_count(spec: DeclaredInput, count: int, found: int | None) -> InvalidInput:
    has = "more" if found is None else str(found)
    return InvalidInput(
        f"input {spec.name!r}: shape {spec.shape} needs {count} elements, data has {has}"
    )


def _misshapen(spec: DeclaredInput) -> InvalidInput:
    return InvalidInput(
        f"input {spec.name!r}: data does not fit shape {spec.shape}: send it flat, or nested "
        "exactly as the shape"
    )
