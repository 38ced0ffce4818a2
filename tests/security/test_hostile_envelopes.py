"""Property-based tests of the MQTT envelopes and every versioned message under hostile bytes
(hypothesis): each either decodes or raises Tether's own error type, never anything else,
and what decodes encodes back to the same. The envelope decoder gets 10,000 examples of
random bytes and 10,000 mutations of valid envelopes. Generation is derandomised, so a
failure reproduces. (The tensor codec's suite is ``test_hostile_input.py``.)
"""

from __future__ import annotations

import json
import random
import struct

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.envelopes import (
    ENVELOPE_TYPES,
    ErrorEnvelope,
    InferRequestEnvelope,
    InferResponseEnvelope,
    decode_envelope,
    frame,
    request_id_of,
    unframe,
)
from shared.errors import InvalidInput
from shared.fleet import FLEET_TYPES
from shared.protocol import HTTP_MESSAGE_TYPES, InferenceRequest, VersionedModel
from tests.security.hostile import MANY, SOME, decodes_or_refuses, json_values, random_json

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- MQTT envelopes


def valid_envelopes() -> list[bytes]:
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": [1, 2],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    request = InferRequestEnvelope(
        request_id="r1",
        model="dense",
        deadline=1e12,
        request=InferenceRequest.model_validate(header),
    )
    response = InferResponseEnvelope(
        request_id="r1",
        response={
            "model_name": "dense",
            "outputs": [{"name": "y", "shape": [1], "datatype": "INT32", "data": [1]}],
        },
    )
    error = ErrorEnvelope(request_id="r1", status=404, reason="not_found", error="no such model")
    return [
        frame(request.dump(), [struct.pack("<2f", 1.0, 2.0)]),
        frame(request.dump()),
        frame(response.dump()),
        frame(error.dump()),
    ]


VALID = valid_envelopes()


@MANY
@given(payload=st.binary(max_size=256))
def test_decode_envelope_on_random_bytes(payload: bytes) -> None:
    decodes_or_refuses(decode_envelope, payload)
    decodes_or_refuses(unframe, payload)
    request_id_of(payload)  # best effort: never raises


def mutated_envelope(seed: int) -> bytes:
    """A valid envelope with bytes flipped, cut, inserted, its length prefix changed or a
    header field replaced, built from ``seed`` (hypothesis draws the seeds: drawing every
    mutation through it cost a minute for the 10,000)."""
    rng = random.Random(seed)
    payload = bytearray(rng.choice(VALID))
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "cut", "insert", "length", "json"])
        if kind == "flip" and payload:
            payload[rng.randrange(len(payload))] = rng.randrange(256)
        elif kind == "cut":
            at = rng.randint(0, len(payload))
            payload = payload[:at] if rng.random() < 0.5 else payload[at:]
        elif kind == "insert":
            at = rng.randint(0, len(payload))
            payload[at:at] = rng.randbytes(rng.randint(1, 8))
        elif kind == "length":
            payload = bytearray(struct.pack(">I", rng.randrange(2**32))) + payload[4:]
        elif kind == "json":
            header, _tail = unframe(bytes(VALID[0]))
            key = rng.choice([*header, "kind", "schema_version", "request"])
            header[key] = random_json(rng)
            payload = bytearray(json.dumps(header).encode())
    return bytes(payload)


@MANY
@given(payload=st.integers(0, 2**64).map(mutated_envelope))
def test_decode_envelope_on_mutated_envelopes(payload: bytes) -> None:
    decoded = decodes_or_refuses(decode_envelope, payload)
    if decoded is not None:
        envelope, _tail = decoded
        assert envelope.kind in ("infer_request", "infer_response", "error")
    request_id_of(payload)


@SOME
@given(
    request_id=st.text(min_size=1, max_size=40),
    model=st.text(max_size=20),
    deadline=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    tail=st.binary(max_size=64),
)
def test_envelopes_round_trip(
    request_id: str, model: str, deadline: float | None, tail: bytes
) -> None:
    header = {
        "inputs": [
            {
                "name": "x",
                "shape": [len(tail)],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": len(tail)},
            }
        ]
    }
    envelope = InferRequestEnvelope(
        request_id=request_id,
        model=model,
        deadline=deadline,
        request=InferenceRequest.model_validate(header),
    )
    decoded, rest = decode_envelope(frame(envelope.dump(), [tail] if tail else None))
    assert isinstance(decoded, InferRequestEnvelope)
    assert decoded.model_dump(exclude={"schema_version"}) == envelope.model_dump(
        exclude={"schema_version"}
    )
    assert bytes(rest) == tail


# ---------------------------------------------------------------------- every versioned message

MESSAGE_TYPES: list[type[VersionedModel]] = [*HTTP_MESSAGE_TYPES, *ENVELOPE_TYPES, *FLEET_TYPES]


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=lambda t: t.__name__)
def test_every_message_type_parses_or_refuses(message_type: type[VersionedModel]) -> None:
    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(raw=st.one_of(st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())))
    def run(raw: bytes) -> None:
        parsed = decodes_or_refuses(message_type.parse, raw)
        if parsed is not None:  # what parses dumps and parses again to the same
            again = message_type.parse(
                orjson.dumps(parsed.dump(), option=orjson.OPT_SERIALIZE_NUMPY)
            )
            assert again.model_dump(exclude={"schema_version"}) == parsed.model_dump(
                exclude={"schema_version"}
            )

    run()


def test_refusals_are_invalid_input() -> None:
    with pytest.raises(InvalidInput):
        decode_envelope(b"\x00\x00\x00\x05{}")
