"""Payload decoding: V2 requests, JSON arrays, {"data": [...]}, raw bytes; and reading ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.runtimes.base import TensorSpec
from edge.sensors.payloads import ModelInputs, decode_payload, reading_id
from shared.errors import InvalidInput, PayloadTooLarge, Unsupported
from shared.mqtt import Message

MODEL = ModelInputs((TensorSpec("pixels", "FP32", (-1, 64)),), max_batch_size=256)
ROW = (np.arange(64) % 16).astype(np.float32)


def test_plain_array_is_one_row_shaped_by_the_metadata() -> None:
    decoded = decode_payload(json.dumps(ROW.tolist()).encode(), MODEL)
    assert decoded.request.inputs["pixels"].shape == (1, 64)
    assert decoded.request.datatypes == {"pixels": "FP32"}
    np.testing.assert_array_equal(decoded.request.inputs["pixels"][0], ROW)


def test_object_with_data_carries_identity_fields() -> None:
    body = {"id": "r1", "seq": 5, "ts": 12.5, "data": [ROW.tolist(), ROW.tolist()]}
    decoded = decode_payload(json.dumps(body).encode(), MODEL)
    assert decoded.rows == 2
    assert (decoded.fields.id, decoded.fields.seq, decoded.fields.timestamp) == ("r1", 5, 12.5)


def test_v2_request() -> None:
    body = {
        "id": "v2-1",
        "parameters": {"timestamp": 7},
        "inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": ROW.tolist()}],
    }
    decoded = decode_payload(json.dumps(body).encode(), MODEL)
    assert decoded.fields.id == "v2-1" and decoded.fields.timestamp == 7
    assert decoded.request.inputs["pixels"].shape == (1, 64)


def test_raw_little_endian_bytes() -> None:
    decoded = decode_payload(ROW.astype("<f4").tobytes(), MODEL)
    np.testing.assert_array_equal(decoded.request.inputs["pixels"], ROW[None, :])


def test_content_type_decides_for_raw_bytes_that_look_like_json() -> None:
    raw = np.full(64, np.frombuffer(b"{\x00\x00\x00", "<f4")[0], dtype="<f4").tobytes()
    assert raw[:1] == b"{"
    decoded = decode_payload(raw, MODEL, content_type="application/octet-stream")
    assert decoded.request.inputs["pixels"].shape == (1, 64)
    with pytest.raises(InvalidInput, match="malformed JSON"):
        decode_payload(raw, MODEL)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (json.dumps([1.0] * 63).encode(), "multiple of 64 values"),
        (json.dumps({"data": ["a"] * 64}).encode(), "must be numbers"),
        (json.dumps({"value": 3}).encode(), 'needs "data"'),
        (b"\x00" * 10, "not whole FP32 values"),
        (b"\x00" * 12, "multiple of 64 values"),
        (b"", "empty payload"),
        (json.dumps([[1, 2], [3]]).encode(), "rectangular"),
    ],
)
def test_malformed_payloads_name_the_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        decode_payload(payload, MODEL)


def test_forced_json_format_refuses_other_json_values() -> None:
    with pytest.raises(InvalidInput, match="must be an array"):
        decode_payload(b'"text"', MODEL, fmt="json")


def test_huge_payload_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        decode_payload(b"[" + b"1," * 600_000 + b"1]", MODEL, max_bytes=1024 * 1024)


def test_integer_models_refuse_fractions_and_multi_input_models_need_v2() -> None:
    ints = ModelInputs((TensorSpec("x", "INT32", (-1, 2)),), max_batch_size=4)
    assert decode_payload(b"[1, 2]", ints).request.inputs["x"].dtype == np.int32
    with pytest.raises(InvalidInput, match="integers"):
        decode_payload(b"[1.5, 2]", ints)
    two = ModelInputs((TensorSpec("a", "FP32", (-1, 1)), TensorSpec("b", "FP32", (-1, 1))), 4)
    with pytest.raises(InvalidInput, match="send a V2 inference request"):
        decode_payload(b"[1]", two)
    dynamic = ModelInputs((TensorSpec("x", "FP32", (-1, -1)),), max_batch_size=4)
    with pytest.raises(Unsupported, match="dynamic"):
        decode_payload(b"[1]", dynamic)


def test_unbatched_model_needs_exactly_its_shape() -> None:
    fixed = ModelInputs((TensorSpec("x", "FP32", (2, 2)),), max_batch_size=0)
    assert decode_payload(b"[1, 2, 3, 4]", fixed).request.inputs["x"].shape == (2, 2)
    with pytest.raises(InvalidInput, match="needs 4 values"):
        decode_payload(b"[1, 2, 3, 4, 5, 6, 7, 8]", fixed)


def test_reading_id_sources_in_order() -> None:
    message = Message(topic="t/s/data", payload=b"[1]")
    decoded = decode_payload(json.dumps({"seq": 9, "data": ROW.tolist()}).encode(), MODEL)
    assert reading_id(message, decoded.fields) == ("9", "seq")
    message.user_properties = {"reading_id": "p1"}
    assert reading_id(message, None) == ("p1", "property")
    message.user_properties = {}
    message.correlation_data = b"c1"
    assert reading_id(message, None) == ("c1", "correlation")
    message.correlation_data = b"\xff\xfe"
    assert reading_id(message, None) == ("fffe", "correlation")
    message.correlation_data = None
    first = reading_id(message, None)
    assert first[1] == "hash" and first[0].startswith("h:")
    assert reading_id(Message(topic="t/other/data", payload=b"[1]"), None)[0] != first[0]
