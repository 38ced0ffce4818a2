"""The JSON and binary tensor codecs: round trips and every way a body can be wrong."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from shared.codec import (
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
from shared.errors import InvalidInput, PayloadTooLarge, SchemaVersionError, Unsupported

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
