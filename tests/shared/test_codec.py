"""The JSON and binary tensor codecs: round trips and every way a body can be wrong."""

from __future__ import annotations

import gc
import json
import re
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
import pytest

from shared.codec import (
    DecodedRequest,
    OutputRequest,
    TensorLimits,
    decode_request,
    decode_response,
    deserialize_bytes,
    encode_request,
    encode_response,
    serialize_bytes,
)
from shared.datatypes import V2_TO_NUMPY
from shared.errors import (
    InvalidInput,
    PayloadTooLarge,
    SchemaVersionError,
    TetherError,
    Unsupported,
)

NUMERIC = [name for name in V2_TO_NUMPY if name != "BYTES"]


def _sample(datatype: str) -> np.ndarray:
    dtype = V2_TO_NUMPY[datatype]
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    return (np.arange(6).reshape(2, 3) * 3 % 7).astype(dtype)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("binary", [False, True])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    body, length = encode_request({"t": array}, {"t": datatype}, binary=binary)
    assert (length is not None) == binary
    decoded = decode_request(body, length)
    assert decoded.datatypes == {"t": datatype}
    assert decoded.inputs["t"].dtype == array.dtype
    np.testing.assert_array_equal(decoded.inputs["t"], array)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    body, length = encode_response(
        model_name="m", model_version="3", outputs={"y": array}, binary_default=binary
    )
    parsed = decode_response(body, length)
    assert parsed["model_name"] == "m" and parsed["model_version"] == "3"
    np.testing.assert_array_equal(parsed["outputs"][0]["data"], array)


def test_bytes_tensors_round_trip_both_ways() -> None:
    array = np.array([b"hello", b"", "ünïcode".encode()], dtype=object)
    blob = serialize_bytes(array)
    assert blob[:4] == struct.pack("<I", 5)
    assert list(deserialize_bytes(blob)) == list(array)
    for binary in (False, True):
        body, length = encode_request({"s": array}, {"s": "BYTES"}, binary=binary)
        assert list(decode_request(body, length).inputs["s"]) == list(array)


def test_nested_json_data_is_accepted_row_major() -> None:
    body = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}]}
    )
    np.testing.assert_array_equal(decode_request(body).inputs["x"], [[1, 2], [3, 4]])


def test_per_output_binary_flags_mix_json_and_binary() -> None:
    outputs = {"a": np.ones((1, 2), np.float32), "b": np.zeros((1, 2), np.int64)}
    body, length = encode_response(
        model_name="m",
        model_version="1",
        outputs=outputs,
        requested=[OutputRequest("a", binary=True), OutputRequest("b", binary=False)],
    )
    assert length is not None
    header = orjson.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert header["outputs"][1]["data"] == [0, 0]
    parsed = decode_response(body, length)
    np.testing.assert_array_equal(parsed["outputs"][0]["data"], outputs["a"])


def _body(inputs: list[dict[str, object]], **extra: object) -> bytes:
    return orjson.dumps({"inputs": inputs, **extra})


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{not json", None, "malformed JSON"),
        (b"[]", None, "must be a JSON object"),
        (b'{"inputs": 3}', None, "invalid InferenceRequest"),
        (_body([{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]), None, "needs 2"),
        (
            _body([{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]),
            None,
            "unknown datatype",
        ),
        (_body([{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]), None, "negative"),
        (
            _body([{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]),
            None,
            "does not fit",
        ),
        (
            _body([{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]),
            None,
            "integers",
        ),
        (
            _body([{"name": "x", "shape": [1], "datatype": "UINT8", "data": [300]}]),
            None,
            "does not fit",
        ),
        (
            _body([{"name": "x", "shape": [2], "datatype": "FP32", "data": [[1], [2, 3]]}]),
            None,
            "does not fit",
        ),
        (_body([{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "neither data"),
        (_body([{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2), None, "twice"),
        (b'{"inputs": []}', 100, "body has"),
        (b'{"inputs": []}', -1, "body has"),
    ],
)
def test_bad_requests_are_invalid_input(body: bytes, length: int | None, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode_request(body, length)


def test_binary_size_mismatch_and_leftover_bytes_are_rejected() -> None:
    header = _body(
        [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]
    )
    with pytest.raises(InvalidInput, match="runs past"):
        decode_request(header + b"\0" * 4, len(header))
    with pytest.raises(InvalidInput, match="belong to no input"):
        decode_request(header + b"\0" * 12, len(header))
    bad_size = _body(
        [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 4}}]
    )
    with pytest.raises(InvalidInput, match="needs 8 bytes"):
        decode_request(bad_size + b"\0" * 4, len(bad_size))
    truncated_bytes = _body(
        [{"name": "s", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]
    )
    with pytest.raises(InvalidInput, match="runs past the data"):
        decode_request(truncated_bytes + struct.pack("<I", 10) + b"ab", len(truncated_bytes))


def test_limits_and_unsupported_extensions() -> None:
    big = _body([{"name": "x", "shape": [1000, 1000], "datatype": "FP32", "data": [0]}])
    with pytest.raises(PayloadTooLarge):
        decode_request(big, None, TensorLimits(max_elements=1000))
    shm = _body(
        [
            {
                "name": "x",
                "shape": [1],
                "datatype": "FP32",
                "parameters": {"shared_memory_region": "r"},
            }
        ]
    )
    with pytest.raises(Unsupported):
        decode_request(shm)


def test_schema_version_rule_on_requests() -> None:
    inputs = [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]
    assert decode_request(_body(inputs, schema_version="1.7", future_field=True)).inputs
    with pytest.raises(SchemaVersionError, match=r"speaks 1\.x"):
        decode_request(_body(inputs, schema_version="2.0"))


# ---------------------------------------------------------------------- memory, checked first


@dataclass(frozen=True)
class Spec:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """A model signature as the codec sees one (a runtime in the product)."""

    inputs: tuple[Spec, ...]
    max_batch_size: int = 0
    name: str = "digits"


SIXTY_FOUR_FLOATS = Signature((Spec("x", "FP32", (1, 64)),))
BODY_BYTES = 32 * 1024 * 1024
#: Rows of 64 numbers of 12 bytes each ("0.123456789,") that make a 32 MiB body.
ROWS = BODY_BYTES // (12 * 64) + 1


def peak_of(call: Callable[[], object]) -> tuple[int, BaseException | None]:
    """Peak bytes Python and numpy allocated during ``call``, and what it raised."""
    gc.collect()
    tracemalloc.start()
    raised: BaseException | None = None
    try:
        call()
    except TetherError as exc:
        raised = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


def json_numbers(shape: list[int], count: int, *, datatype: str = "FP32") -> bytes:
    """A JSON request declaring ``shape`` whose data holds ``count`` numbers."""
    data = (b"0.123456789," * count)[:-1]
    return b'{"inputs":[{"name":"x","datatype":"%s","shape":%s,"data":[%s]}]}' % (
        datatype.encode(),
        orjson.dumps(shape),
        data,
    )


def binary_request(shape: list[int], size: int, datatype: str = "FP32") -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    )
    return header + bytes(size), len(header)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ([1, 64], "needs 64 elements, data has more"),  # the shape it claims is the model's
        ([ROWS, 64], "must have shape [1, 64]"),  # the shape it carries
    ],
)
def test_a_32_mib_json_request_for_64_floats_is_refused_before_allocation(
    declared: list[int], message: str
) -> None:
    body = json_numbers(declared, ROWS * 64)
    assert len(body) >= BODY_BYTES
    peak, raised = peak_of(lambda: decode_request(body, None, None, SIXTY_FOUR_FLOATS))
    assert isinstance(raised, InvalidInput) and message in raised.message
    # decoding it whole took ~13x the body (~420 MB); now a 64 KiB piece of text at a time
    assert peak < 3 * 1024 * 1024, peak


@pytest.mark.parametrize(
    ("declared", "datatype", "message"),
    [
        ([1, 64], "FP32", "needs 256 bytes"),
        ([BODY_BYTES // 256, 64], "FP32", "must have shape [1, 64]"),
        ([BODY_BYTES // 4], "BYTES", "must be FP32"),
    ],
)
def test_a_32_mib_binary_request_for_64_floats_is_refused_before_allocation(
    declared: list[int], datatype: str, message: str
) -> None:
    body, length = binary_request(declared, BODY_BYTES, datatype)
    peak, raised = peak_of(lambda: decode_request(body, length, None, SIXTY_FOUR_FLOATS))
    assert isinstance(raised, InvalidInput) and message in raised.message
    assert peak < 64 * 1024, peak  # nothing of the 32 MiB was copied or made into objects


def test_json_the_model_accepts_decodes_within_twice_its_size() -> None:
    model = Signature((Spec("x", "FP32", (-1, 64)),))
    rows = 4096
    values = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    for data in (values.ravel(), values):  # flat and nested
        body = orjson.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 64], "data": data}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        decoded: list[DecodedRequest] = []
        peak, raised = peak_of(lambda: decoded.append(decode_request(body, None, None, model)))  # noqa: B023
        assert raised is None
        np.testing.assert_array_equal(decoded[0].inputs["x"], values)
        assert peak <= 2 * len(body), peak / len(body)


def test_many_tiny_inputs_cannot_make_the_header_costly() -> None:
    one = b'{"name":"x","datatype":"FP32","shape":[1]},'
    body = b'{"inputs":[' + one * 400_000 + b'{"name":"x","datatype":"FP32","shape":[1]}]}'
    peak, raised = peak_of(lambda: decode_request(body, None, None, SIXTY_FOUR_FLOATS))
    assert isinstance(raised, PayloadTooLarge)
    assert raised.message == "the request holds 400002 JSON objects, over the limit of 4096"
    assert peak < 64 * 1024, peak  # counted, not decoded: no objects per input


@pytest.mark.parametrize(
    ("datatype", "data", "expected"),
    [
        ("FP16", [0.5, -1.25, 3.0], np.array([0.5, -1.25, 3.0], np.float16)),
        ("FP64", [1e300, -2.5e-300, 0.1], np.array([1e300, -2.5e-300, 0.1])),
        ("INT32", [-(2**31), 2**31 - 1, 7], np.array([-(2**31), 2**31 - 1, 7], np.int32)),
        ("INT64", [2**63 - 1, -(2**63), 1], np.array([2**63 - 1, -(2**63), 1], np.int64)),
        ("UINT64", [2**64 - 1, 0, 5], np.array([2**64 - 1, 0, 5], np.uint64)),
        ("UINT8", [255, 0, 17], np.array([255, 0, 17], np.uint8)),
        ("BOOL", [True, False, True], np.array([True, False, True])),
    ],
)
def test_large_json_data_decodes_exactly(
    datatype: str, data: list[object], expected: np.ndarray
) -> None:
    repeat = 3000  # well past the size where numbers are parsed straight from the text
    body = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": datatype, "shape": [repeat, 3], "data": [data] * repeat}
            ]
        }
    )
    decoded = decode_request(body).inputs["x"]
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, np.tile(expected, (repeat, 1)))


@pytest.mark.parametrize(
    ("datatype", "shape", "data", "message"),
    [
        ("UINT8", [3000], [300] * 3000, "does not fit datatype UINT8"),
        ("INT32", [3000], [1.5] * 3000, "integers, got numbers with fractions"),
        ("INT64", [3000], [2**64] * 3000, "does not fit datatype INT64"),
        ("FP32", [1000, 3], [[1, 2, 3, 4]] * 750, "send it flat, or nested exactly"),
        ("FP32", [3000], [[1.0]] * 3000, "send it flat, or nested exactly"),
        ("FP32", [3000], [1.0] * 2999, "needs 3000 elements, data has 2999"),
        ("FP32", [3000], ["one"] * 3000, "does not fit datatype FP32"),
        ("FP32", [1000, 3], [[1.0, "two", 3.0]] * 1000, "does not fit shape"),
        ("BOOL", [3000], [True] * 3001, "needs 3000 elements"),
    ],
)
def test_large_json_data_that_does_not_fit_is_refused(
    datatype: str, shape: list[int], data: list[object], message: str
) -> None:
    body = json.dumps(  # the standard library: integers past 64 bits too
        {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    ).encode()
    with pytest.raises(InvalidInput, match=re.escape(message)):
        decode_request(body)


def test_bytes_go_only_to_models_that_take_bytes() -> None:
    def strings(text: str, count: int = 200_000) -> bytes:
        return orjson.dumps(
            {
                "inputs": [
                    {"name": "x", "datatype": "BYTES", "shape": [count], "data": [text] * count}
                ]
            }
        )

    body = strings("text")
    peak, raised = peak_of(lambda: decode_request(body, None, None, SIXTY_FOUR_FLOATS))
    assert isinstance(raised, InvalidInput) and "must be FP32, got BYTES" in raised.message
    assert peak < 64 * 1024, peak  # not one string was made
    texts = Signature((Spec("x", "BYTES", (-1,)),))  # braces in its strings are no objects
    assert list(decode_request(strings("{a}"), None, None, texts).inputs["x"][:2]) == [b"{a}"] * 2
