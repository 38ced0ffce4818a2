"""10,000 generated hostile sensor messages through the bridge's own path (hypothesis).

Each example is a burst of 50 messages, good and hostile mixed, taken the way the running
bridge takes them: stored in the real intake (SQLite), handed out by the lane, decoded,
inferred by the real data plane (``digits``: a cascade of the real ``digits-student`` ONNX
model over a cloud that cannot be reached, so escalations degrade and wait as
corrections), encoded, and committed into the outbox. Only MQTT itself is left out: the
network thread does nothing with a message but hand it to the intake.

The contract: nothing raises; every message is answered exactly once (a result or an
error message, with a bounded, scalar identity); every good message gets its result; the
intake is empty afterwards. Generation is derandomised, so a failure reproduces.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.sensors.bridge import SensorBridge, lane_key
from edge.sensors.identity import MAX_IDENTITY_CHARS
from edge.settings import load_settings
from harness.broker import free_port
from models.digits import load_split
from serving.settings import RuntimeSettings
from shared.mqtt import Message
from tests.conftest import REPOSITORY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (REPOSITORY / "digits-student" / "1" / "model.onnx").is_file(),
        reason="the digits models are not built (tether models build)",
    ),
]

DEVICE = "fuzz-dev"
BURST = 50
EXAMPLES = int(os.environ.get("TETHER_FUZZ_EXAMPLES", "200"))  # x 50 messages = 10,000
STOP = threading.Event()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SensorBridge]:
    """The real bridge, its models loaded, without a broker (nothing is published here)."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    settings = load_settings(
        None,
        device_id=DEVICE,
        data_dir=data_dir,
        mqtt_url=f"mqtt://127.0.0.1:{free_port()}",  # no cloud: escalations degrade
        repository=REPOSITORY,
        models=["digits-student"],
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
        routes={
            "digits": {
                "mode": "cascade",
                "local_model": "digits-student",
                "cloud_model": "digits-teacher",
                "threshold": 0.9,
            }
        },
        uplink={"connect_wait_s": 0, "breaker_failures": 1_000_000},
        sensors={
            "metrics_port": None,
            "corrections": True,
            "max_payload_bytes": 64 * 1024,
            "outbox": {"synchronous": "normal"},
        },
    )
    instance = SensorBridge(settings)
    instance.agent.start()
    yield instance
    instance.database.close()
    instance.agent.close()


# ---------------------------------------------------------------------- strategies
# A draw is what hypothesis spends its time on, so a message is one number (cut into a
# kind, sizes and depths) and, for some kinds, random bytes; plain Python turns them into
# the payload. Rows and names come from fixed lists.

ROWS = [row.tolist() for row in load_split("test")[0][:64]]
SENSORS = ["s1", "", "ß-β-\u200b", "x" * 200, "a b", "$sys", "1", "\U0001f600", "..", "-"]
WEIRD = [
    '"\\ud800"', "1e400", "-0", "18446744073709551616", '"\\u0000"', "1e308", "true",
    "null", '{"a": [1, {"b": null}]}', "[[], {}]", '""', "-9223372036854775809", "0.1",
]  # fmt: skip
IDENTITY_KEYS = ["id", "reading_id", "seq", "timestamp", "ts", "time"]


def nested(depth: int, leaf: str = "1") -> str:
    """JSON text nested ``depth`` levels deep in arrays and objects."""
    text = leaf
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k": {text}}}'
    return text


def identity_value(kind: int, size: int) -> str:
    """JSON text for an identity field: fine, too long, of the wrong type, or nested deep."""
    if kind == 0:
        return nested(size % 1500 + 1)
    if kind == 1:
        return json.dumps("x" * (size % (4 * MAX_IDENTITY_CHARS)))
    if kind == 2:
        return json.dumps(list(range(size % 50)))
    if kind == 3:
        return json.dumps({str(n): n for n in range(size % 20)})
    if kind == 4:
        return str(size * 10**size % 10**30)
    return WEIRD[size % len(WEIRD)]


def data_value(kind: int, size: int) -> str:
    """JSON text for ``data``: a row, a wrong length, nested, ragged, strings, objects."""
    row = ROWS[size % len(ROWS)]
    return [
        json.dumps(row),
        json.dumps(row * (size % 4 + 2)),
        json.dumps([1.5] * (size % 130)),
        nested(size % 1500 + 1, "[1.0]"),
        json.dumps([row, row[:3]]),
        json.dumps(["a"] * 64),
        identity_value(size % 6, size),
    ][kind % 7]


def hostile_payload(kind: int, a: int, b: int, c: int, blob: bytes) -> bytes:
    """A hostile payload of one of eight kinds, shaped by three numbers and some bytes."""
    key = IDENTITY_KEYS[a % len(IDENTITY_KEYS)]
    if kind == 0:  # an object reading with a hostile identity field (and maybe data)
        fields = {"id": json.dumps(f"h{a}"), key: identity_value(b % 6, c)}
        if c % 3:
            fields["data"] = data_value(b // 6, c)
        return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items()) + "}").encode()
    if kind == 1:  # a V2 request with a hostile id, parameter, shape or datatype
        shape = ["[1, 64]", "[64]", "[2, 64]", "[-1, 64]", "[1099511627776]", "[]"][b % 6]
        datatype = ["FP32", "INT8", "BYTES", "FP99"][c % 4]
        inputs = (
            f'[{{"name": "pixels", "shape": {shape}, "datatype": "{datatype}", '
            f'"data": {data_value(a, c)}}}]'
        )
        if b % 5 == 0:
            inputs = identity_value(c % 6, a)
        ident = identity_value(a % 6, b) if c % 2 else '"v2"'
        return (
            f'{{"id": {ident}, "parameters": {{"{key}": {identity_value(b % 6, c)}}}, '
            f'"inputs": {inputs}}}'
        ).encode()
    if kind == 2:
        return blob
    if kind == 3:
        return nested(a % 1500 + 1).encode()
    if kind == 4:  # over max_payload_bytes
        return b"[" + b"1," * (33 * 1024 + c % 8000) + b"1]"
    if kind == 5:
        return data_value(a, b).encode()
    if kind == 6:  # raw bytes that are not whole FP32 values, or are NaN
        return blob[: 4 * (a % 70) + 1] if b % 2 else np.full(64, np.nan, "<f4").tobytes()
    return identity_value(a % 6, b).encode()


CONTENT_TYPES = [None, "application/json", "application/octet-stream", "text/x", None, None]


@st.composite
def message(draw: st.DrawFn, index: int) -> tuple[Message, str | None]:
    """One message on a data topic, and the reading id it must be answered with when good."""
    n = draw(st.integers(0, 2**64 - 1))  # one draw, cut into a kind and three numbers
    kind, a, b, c = n % 12, (n >> 4) & 0xFFFF, (n >> 20) & 0xFFFF, (n >> 36) & 0xFFFF
    topic = f"tether/{DEVICE}/sensors/{SENSORS[a % len(SENSORS)]}/data"
    row = ROWS[b % len(ROWS)]
    reading_id = f"good-{index}"
    if kind == 8:  # good: an object reading
        body = {"id": reading_id, "seq": index, "ts": 1.5, "data": row}
        return Message(topic, json.dumps(body).encode(), qos=1), reading_id
    if kind == 9:  # good: a V2 request
        inputs = [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row}]
        body = {"id": reading_id, "inputs": inputs}
        return Message(topic, json.dumps(body).encode(), qos=1), reading_id
    if kind == 10:  # good: raw bytes, the id in the correlation data
        return Message(
            topic,
            np.asarray(row, "<f4").tobytes(),
            qos=1,
            correlation_data=reading_id.encode(),
            content_type="application/octet-stream",
        ), reading_id
    if kind == 11:  # good: a JSON array, the id in a user property
        props = {"id": reading_id}
        return Message(topic, json.dumps(row).encode(), qos=1, user_properties=props), reading_id
    blob = draw(st.binary(max_size=600)) if kind in (2, 6) else b""
    props = {}
    if c % 3 == 0:
        prop = ["id", "reading_id", "seq", "ts", "other"][b % 5]
        props = {prop: "p" * (a % (4 * MAX_IDENTITY_CHARS))}
    correlation = None
    if b % 3 == 0:
        correlation = bytes([a % 256]) * (1 + c % (2 * MAX_IDENTITY_CHARS))
    message = Message(
        topic,
        hostile_payload(kind, a, b, c, blob),
        qos=1,
        correlation_data=correlation,
        user_properties=props,
        content_type=CONTENT_TYPES[(a + c) % len(CONTENT_TYPES)],
    )
    return message, None


@st.composite
def burst(draw: st.DrawFn) -> list[tuple[Message, str | None]]:
    return [draw(message(index)) for index in range(BURST)]


# ---------------------------------------------------------------------- the property

SCALARS = (str, int, float, bool, type(None))


def check_published(payload: bytes) -> dict[str, Any]:
    """A published message: JSON of bounded size whose identity fields keep the rule."""
    assert len(payload) < 200 * 1024
    body = orjson.loads(payload)
    assert body["kind"] in ("result", "error")
    for key in ("reading_id", "seq", "timestamp"):
        value = body.get(key)
        assert isinstance(value, SCALARS), (key, value)
        assert len(str(value)) <= 2 * MAX_IDENTITY_CHARS, key
    if isinstance(body.get("timestamp"), float):
        assert math.isfinite(body["timestamp"])
    return dict(body)


def test_ten_thousand_hostile_messages_through_the_bridge_path(bridge: SensorBridge) -> None:
    lane = bridge.lanes[lane_key(bridge.bindings[0])]
    seen = {"messages": 0, "good": 0, "errors": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(burst())
    def one_burst(messages: list[tuple[Message, str | None]]) -> None:
        first = bridge.outbox.peek_results(1)
        assert not first
        added = bridge.intake.add([(m, lane.key) for m, _ in messages])
        assert added.stored == BURST
        answered: list[Any] = []
        while batch := bridge.intake.next_batch(
            lane.key, max_messages=32, max_delay_s=0, stop=STOP, idle_s=0
        ):
            answered.append((batch, lane.answer(batch)))
        bridge._commit(answered)
        assert bridge.intake.depth() == 0
        published = bridge.outbox.peek_results(10 * BURST)
        bridge.outbox.delete_results([row.seq for row in published])
        bodies = [check_published(row.payload) for row in published]
        assert len(bodies) == BURST  # exactly one message per reading
        by_id = {body["reading_id"]: body for body in bodies}
        for msg, good_id in messages:
            if good_id is None:
                continue
            body = by_id[good_id]
            assert body["kind"] == "result", body
            assert len(body["outputs"][0]["data"]) == 10
            assert body["topic"] == msg.topic
            seen["good"] += 1
        seen["messages"] += BURST
        seen["errors"] += sum(1 for body in bodies if body["kind"] == "error")
        escalations = bridge.outbox.peek_escalations(10 * BURST)
        bridge.outbox.complete_escalations([e.seq for e in escalations], ())

    one_burst()
    print(seen)
    assert seen["messages"] >= 10_000
    assert seen["good"] > 1000 and seen["errors"] > 5000
