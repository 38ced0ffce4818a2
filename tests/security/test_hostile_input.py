"""Property-based tests of the tensor codec under hostile bytes (hypothesis).

The contract: any input either decodes or raises Tether's own error type
(:class:`~shared.errors.TetherError`), never anything else; and encoding then decoding
gives back what went in. The binary tensor codec gets 10,000 examples each of random
bytes and of structured near-misses (the envelopes' suite is ``test_hostile_envelopes.py``).
Generation is derandomised, so a failure reproduces.
"""

from __future__ import annotations

import json
import math
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from harness.agent_process import AgentProcess
from harness.onnx_models import dense_model, write_model
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
from shared.datatypes import to_numpy_dtype
from shared.errors import TetherError
from tests.security.hostile import MANY, SOME, decodes_or_refuses, random_json

LIMITS = TensorLimits(max_elements=4096, max_inputs=8)
DATATYPES = ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]
NUMERIC = [d for d in DATATYPES if d != "BYTES"]

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------- strategies

#: Dimensions that are almost right, and ones at the edges of every integer width.
ODD_DIMS = [0, 2**31, 2**62, 2**63, 2**64, -(2**63), 10**30]
DATATYPE_NEAR_MISSES = [*DATATYPES, "FP8", "int32", ""]


def coherent_input(rng: random.Random) -> dict[str, Any]:
    """An input that is right, or off by one element: the decoder's success paths."""
    datatype = rng.choice(NUMERIC)
    shape = [rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
    count = math.prod(shape) + rng.choice([0, 0, 0, 1, -1])
    if datatype == "BOOL":
        data: list[Any] = [rng.random() < 0.5 for _ in range(max(0, count))]
    elif datatype.startswith("FP"):
        data = [rng.uniform(-1e3, 1e3) for _ in range(max(0, count))]
    else:
        data = [rng.randint(0, 100) for _ in range(max(0, count))]
    return {"name": rng.choice(["x", "y"]), "shape": shape, "datatype": datatype, "data": data}


def near_miss_input(rng: random.Random) -> dict[str, Any]:
    """An input tensor header that is almost right: real datatypes, odd shapes and sizes."""
    if rng.random() < 0.3:
        return coherent_input(rng)
    entry: dict[str, Any] = {
        "name": rng.choice(["x", "y", "", "x"]),
        "shape": [
            rng.choice([rng.randint(-2, 8), rng.choice(ODD_DIMS)]) for _ in range(rng.randrange(5))
        ],
        "datatype": rng.choice(DATATYPE_NEAR_MISSES),
    }
    if rng.random() < 0.5:
        entry["parameters"] = {
            "binary_data_size": rng.choice(
                [rng.randint(-4, 64), rng.choice([2**63, 1.5, "8", True, None])]
            )
        }
    if rng.random() < 0.5:
        entry["data"] = random_json(rng)
    return entry


def near_miss_request(seed: int) -> tuple[bytes, int | None]:
    """A request body (JSON header + binary tail) with a plausible or hostile header length,
    built from ``seed`` (hypothesis draws the seeds: drawing every field through it cost
    ~6 ms an example, a minute for the 10,000)."""
    rng = random.Random(seed)
    header: dict[str, Any] = {"inputs": [near_miss_input(rng) for _ in range(rng.randrange(4))]}
    if rng.random() < 0.5:
        outputs = []
        for _ in range(rng.randrange(3)):
            output: dict[str, Any] = {"name": rng.choice(["", "y", "z", "yy"])}
            if rng.random() < 0.5:
                output["parameters"] = {
                    key: random_json(rng, depth=3)
                    for key in rng.sample(["binary_data", "classification"], rng.randrange(3))
                }
            outputs.append(output)
        header["outputs"] = outputs
    if rng.random() < 0.5:
        header["schema_version"] = rng.choice(["1.0", "1.7", "2.0", "x", None])
    encoded = json.dumps(header).encode()  # stdlib: big integers, NaN and Infinity too
    mode = rng.random()
    if mode < 0.4:  # plain JSON
        return encoded, None
    tail = rng.randbytes(rng.randrange(97))
    if mode < 0.7:  # a binary tail after an honest header length
        return encoded + tail, len(encoded)
    length = rng.choice([None, rng.randint(-3, len(encoded) + len(tail) + 3)])
    return encoded + tail, length


@st.composite
def tensors(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        flat = draw(
            st.lists(
                st.binary(max_size=6), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
            )
        )
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape), datatype
    dtype = to_numpy_dtype(datatype)
    elements = None
    if dtype.kind == "f":
        width: Literal[16, 32, 64] = {2: 16, 4: 32}.get(dtype.itemsize, 64)  # type: ignore[assignment]
        elements = st.floats(width=width, allow_nan=False)
    array = draw(hnp.arrays(dtype, shape, elements=elements))
    return array, datatype


def assert_same(decoded: np.ndarray, original: np.ndarray) -> None:
    assert decoded.shape == original.shape
    if original.dtype == object:
        assert [bytes(v) for v in decoded.ravel()] == [bytes(v) for v in original.ravel()]
    else:
        np.testing.assert_array_equal(decoded, original)


# ---------------------------------------------------------------------- binary tensor codec


@MANY
@given(body=st.binary(max_size=256), header_length=st.none() | st.integers(-4, 300))
def test_decode_request_on_random_bytes(body: bytes, header_length: int | None) -> None:
    decodes_or_refuses(decode_request, body, header_length, LIMITS)


@MANY
@given(request=st.integers(0, 2**64).map(near_miss_request))
def test_decode_request_on_near_miss_requests(request: tuple[bytes, int | None]) -> None:
    body, header_length = request
    decoded = decodes_or_refuses(decode_request, body, header_length, LIMITS)
    if decoded is not None:
        for array in decoded.inputs.values():
            assert array.size <= LIMITS.max_elements


@SOME
@given(
    inputs=st.dictionaries(st.sampled_from(["a", "b", "c"]), tensors(), min_size=1, max_size=3),
    binary=st.booleans(),
)
def test_requests_round_trip(inputs: dict[str, tuple[np.ndarray, str]], binary: bool) -> None:
    arrays = {name: array for name, (array, _) in inputs.items()}
    datatypes = {name: datatype for name, (_, datatype) in inputs.items()}
    if not binary:  # JSON cannot carry every float exactly or bytes that are not UTF-8
        for name, (array, datatype) in inputs.items():
            if datatype in ("FP16", "FP32", "FP64") or datatype == "BYTES":
                arrays[name] = np.zeros(array.shape, to_numpy_dtype("INT32"))
                datatypes[name] = "INT32"
    body, length = encode_request(arrays, datatypes, request_id="r1", binary=binary)
    decoded = decode_request(body, length)
    assert decoded.id == "r1" and decoded.datatypes == datatypes
    for name, array in arrays.items():
        assert_same(decoded.inputs[name], array)


@SOME
@given(outputs=st.dictionaries(st.sampled_from(["y", "z"]), tensors(), min_size=1, max_size=2))
def test_binary_responses_round_trip(outputs: dict[str, tuple[np.ndarray, str]]) -> None:
    arrays = {name: array for name, (array, _) in outputs.items()}
    body, length = encode_response(
        model_name="m",
        model_version="1",
        outputs=arrays,
        datatypes={name: datatype for name, (_, datatype) in outputs.items()},
        requested=[OutputRequest(name, binary=True) for name in arrays],
    )
    decoded = decode_response(body, length)
    for out in decoded["outputs"]:
        assert_same(out["data"], arrays[out["name"]])


@SOME
@given(body=st.binary(max_size=256), header_length=st.none() | st.integers(-4, 300))
def test_decode_response_on_random_bytes(body: bytes, header_length: int | None) -> None:
    decodes_or_refuses(decode_response, body, header_length)


@SOME
@given(buffer=st.binary(max_size=64))
def test_bytes_elements_decode_or_refuse(buffer: bytes) -> None:
    decodes_or_refuses(deserialize_bytes, buffer)


@SOME
@given(items=st.lists(st.binary(max_size=20), max_size=8))
def test_bytes_elements_round_trip(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    assert list(deserialize_bytes(serialize_bytes(array))) == items


@pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 0, 5], [0] * 70, [0, 2**40]])
def test_empty_tensors_with_impossible_shapes_are_refused(shape: list[int]) -> None:
    """Found by the property tests: these crashed numpy's reshape (a 500, or a cloud request
    left unanswered) before the codec bounded every dimension."""
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]})
    with pytest.raises(TetherError) as caught:
        decode_request(body.encode())
    assert caught.value.status in (400, 413)


# ---------------------------------------------------------------------- a real agent's memory

HOSTILE_BYTES = 32 * 1024 * 1024


def peak_rss_mb(agent: AgentProcess) -> int:
    """The highest resident memory (VmHWM) any of the agent's processes has had, in MiB."""
    peaks = []
    for pid in agent.pids():
        with open(f"/proc/{pid}/status") as status:
            peaks += [int(line.split()[1]) // 1024 for line in status if line.startswith("VmHWM")]
    return max(peaks)


def post(agent: AgentProcess, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        agent.url + "/v2/models/sixty-four/infer", data=body, method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def test_32_mib_requests_for_64_floats_cost_a_real_agent_only_their_body(
    tmp_path: Path,
) -> None:
    """A model that takes 64 floats; three 32 MiB requests it cannot take. Each used to be
    decoded whole before the model was asked (~8x the body, +254 MB peak RSS for the first);
    now what the request declares is checked first and nothing is built from the data."""
    repository = tmp_path / "repository"
    write_model(repository, "sixty-four", dense_model(64, 10), config={"max_batch_size": 1})
    agent = AgentProcess(tmp_path / "agent", repository=repository, args=["--workers", "1"])
    agent.start()
    try:
        before = peak_rss_mb(agent)
        rows = HOSTILE_BYTES // (12 * 64) + 1  # "0.123456789," is 12 bytes
        numbers = (b"0.123456789," * (rows * 64))[:-1]
        json_type = {"Content-Type": "application/json"}
        lying = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,64],"data":[%s]}]}' % numbers
        assert post(agent, lying, json_type) == (
            400,
            {"error": "input 'x': shape [1, 64] needs 64 elements, data has more"},
        )
        honest = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d,64],"data":[%s]}]}' % (
            rows,
            numbers,
        )
        assert post(agent, honest, json_type) == (
            400,
            {"error": f"batch of {rows} is over model 'sixty-four''s max_batch_size 1"},
        )
        del numbers, lying, honest
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "BYTES",
                        "shape": [HOSTILE_BYTES // 4],
                        "parameters": {"binary_data_size": HOSTILE_BYTES},
                    }
                ]
            }
        )
        status, answer = post(
            agent,
            header + bytes(HOSTILE_BYTES),
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert (status, answer) == (
            400,
            {"error": "input 'x' of model 'sixty-four' must be FP32, got BYTES"},
        )
        grown = peak_rss_mb(agent) - before
        # receiving a body costs about twice its size (the server's buffer and the bytes);
        # decoding it would have cost several times more
        assert grown < 4 * HOSTILE_BYTES // (1024 * 1024), f"peak RSS grew {grown} MiB"
        good = orjson.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        )
        status, answer = post(agent, good, json_type)
        assert status == 200 and answer["outputs"][0]["shape"] == [1, 10]
    finally:
        agent.stop()
