"""Payload decoding: V2 requests, JSON arrays, {"data": [...]}, raw bytes; and reading ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge.sensors.identity import MAX_IDENTITY_CHARS, Fields, identify
from edge.sensors.payloads import ModelInputs, decode_payload
from serving.runtimes.base import TensorSpec
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
    def reading_id(message: Message, fields: Fields | None) -> tuple[str, str]:
        identity = identify(message, fields)
        return identity.reading_id, identity.source

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


DEEP = "[" * 300 + "1" + "]" * 300


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("id", {"a": 1}, "must be a string, number or boolean"),
        ("timestamp", [1, 2], "got an array"),
        ("seq", "x" * 257, "257 characters"),
        ("ts", DEEP, "must be a string"),
    ],
)
def test_identity_fields_that_break_the_rule_are_named_and_left_out(
    field: str, value: object, reason: str
) -> None:
    body = json.dumps({"id": "good-1", field: value, "data": ROW.tolist()})
    if value == DEEP:
        body = body.replace(json.dumps(DEEP), DEEP)  # nested 300 levels, not a string
    decoded = decode_payload(body.encode(), MODEL)
    assert decoded.fields.problem is not None and reason in decoded.fields.problem
    identity = identify(Message(topic="t/s/data", payload=body.encode()), decoded.fields)
    assert identity.problem == decoded.fields.problem
    # only fields that keep the rule are carried on
    assert all(
        v is None or isinstance(v, str | int | float | bool)
        for v in (identity.seq, identity.timestamp)
    )
    assert len(identity.reading_id) <= MAX_IDENTITY_CHARS + 2


def test_overlong_properties_and_correlation_data_break_the_rule() -> None:
    message = Message(topic="t/s/data", payload=b"[1]", user_properties={"id": "p" * 300})
    identity = identify(message, None)
    assert identity.problem and "300 characters" in identity.problem
    assert identity.source == "hash"
    message = Message(topic="t/s/data", payload=b"[1]", correlation_data=b"c" * 300)
    identity = identify(message, None)
    assert identity.problem and "300 bytes" in identity.problem and identity.source == "hash"
