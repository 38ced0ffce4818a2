"""10,000 generated device statuses and events through the controller's intake (hypothesis).

Each example is a burst of 50 messages, good and hostile mixed, taken the way the running
controller takes them: the MQTT handlers read each one (bounded decoding) into the inbox,
and the recorder stores the inbox in batches. Only the broker is left out here; a smaller
run at the end sends generated bursts through a real Mosquitto to a started controller.

The contract: nothing raises out of the intake; every good status and every good event is
recorded (a ``reason`` cut to its bound); nothing hostile makes the database refuse a
report (every one is refused when read, or stored); the controller never counts a good
message as dropped. Generation is derandomised, so a failure reproduces.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.fleet_db import FleetDB
from cloud.rollout import RolloutController
from harness.broker import Broker
from harness.fleet import BACKENDS, open_db, policy, wait_for
from shared.bounded_json import MAX_REPORT_BYTES, truncate
from shared.fleet import MAX_REASON_CHARS
from shared.manifest import generate_key
from shared.mqtt import Message, MqttClient
from tests.cloud.test_intake import Fleet, nested, with_raw

BURST = 50
EXAMPLES = int(os.environ.get("TETHER_FUZZ_EXAMPLES", "200"))  # x 50 messages = 10,000
RID = "r-fuzz"
#: Devices of the rollout whose events are good; hostile messages use other devices.
MEMBERS = [f"e{i:02d}" for i in range(BURST)]
STEPS = ["received", "downloading", "verifying", "staged", "active", "committed", "failed"]
_serial = itertools.count()


def text(rng: random.Random, max_size: int, *, nul: bool = True) -> str:
    """Any characters (from every plane, NUL too unless ``nul`` is false), no lone
    surrogates (they are not UTF-8 at all)."""
    out = []
    for _ in range(rng.randint(0, max_size)):
        pick = rng.random()
        if pick < 0.6:
            code = rng.randint(0x20, 0x7E)
        elif pick < 0.7:
            code = rng.randint(0, 0x1F)
        else:
            code = rng.choice([rng.randint(0x80, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])
        if code == 0 and not nul:
            code = 0x30
        out.append(chr(code))
    return "".join(out)


def json_value(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value at most 4 levels deep below ``depth``."""
    pick = rng.randint(0, 7 if depth < 4 else 4)
    if pick == 0:
        return None
    if pick == 1:
        return rng.random() < 0.5
    if pick == 2:
        return rng.randint(-(2**60), 2**60)
    if pick == 3:
        return rng.uniform(-1e300, 1e300) if rng.random() < 0.3 else rng.random()
    if pick == 4:
        return text(rng, 30)
    if pick == 5:
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {text(rng, 10): json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def good_status(rng: random.Random) -> tuple[Message, dict[str, Any]]:
    device = f"s{next(_serial)}"
    body: dict[str, Any] = {
        "kind": "device_status",
        "device": device,
        "online": True,
        "agent_version": f"v{next(_serial)}",
        "hardware": text(rng, 20, nul=False),
        "labels": {text(rng, 20): text(rng, 60) for _ in range(rng.randint(0, 8))},
        "models": {
            f"m{rng.randint(0, 99)}.{text(rng, 5, nul=False).encode().hex()}"[:100]: {
                "active": rng.randint(1, 2**31 - 1),
                "previous": rng.choice([None, rng.randint(1, 1000)]),
                "state": rng.choice(["active", "committed", ""]),
            }
            for _ in range(rng.randint(0, 4))
        },
        "health": {text(rng, 10): json_value(rng) for _ in range(rng.randint(0, 6))},
    }
    if rng.random() < 0.5:
        body["schema_version"] = "1.1"
    return Message(f"tether/{device}/status", json.dumps(body).encode(), qos=1, retain=True), body


def good_event(rng: random.Random) -> tuple[Message, dict[str, Any]]:
    device = rng.choice(MEMBERS)
    body: dict[str, Any] = {
        "kind": "rollout_event",
        "rollout_id": RID,
        "device": device,
        "model": "digits",
        "version": rng.randint(0, 2**31 - 1),
        "step": rng.choice(STEPS),
        "reason": f"#{next(_serial)} " + text(rng, rng.choice([20, 1500])),
        "at": rng.uniform(0, 4e9),
    }
    if rng.random() < 0.5:
        body["health"] = {
            "requests": rng.randint(0, 2**53),
            "errors": rng.randint(0, 1000),
            "shadow_samples": rng.randint(0, 1000),
            "shadow_agreement": rng.choice([None, rng.random()]),
            "p99_ms": rng.choice([None, rng.uniform(0, 1e6)]),
        }
    return Message(f"tether/{device}/rollout/events", json.dumps(body).encode(), qos=1), body


def hostile_value(rng: random.Random) -> Any:
    """A value of the wrong size, type or range for most fields."""
    return rng.choice(
        [
            lambda: rng.randint(2**53 + 1, 2**80),
            lambda: -rng.randint(1, 2**40),
            lambda: 2**31,
            lambda: rng.uniform(-1e308, 1e308),
            lambda: text(rng, 400) + "x" * 201,
            lambda: "a\x00b",
            lambda: [rng.randint(0, 9) for _ in range(rng.randint(1, 5))],
            lambda: {f"k{i}" * 20: "v" * rng.randint(0, 300) for i in range(65)},
            lambda: json_value(rng),
        ]
    )()


#: What a broken or malicious device sends (``ATTACKS`` kinds, on its own topics).
ATTACKS = 8


def hostile(rng: random.Random, attack: int) -> Message:
    device = f"h{next(_serial)}"
    status = rng.random() < 0.5
    topic = f"tether/{device}/status" if status else f"tether/{device}/rollout/events"
    base, _ = good_status(rng) if status else good_event(rng)
    payload = base.payload
    if attack == 0:  # not JSON, or not UTF-8
        payload = rng.randbytes(rng.randint(0, 300))
    elif attack == 1:  # JSON, but not a report
        payload = json.dumps(json_value(rng)).encode()
    elif attack == 2:  # nested past every bound, up to past orjson's own
        field = rng.choice(["health", "labels", "models", "reason", "at", "version"])
        payload = with_raw(payload, field, nested(rng.choice([17, 64, 300, 999, 1020, 1030])))
    elif attack == 3:  # a field of the wrong size, type or range
        body = json.loads(payload)
        body[rng.choice(sorted(body))] = hostile_value(rng)
        payload = json.dumps(body).encode()
    elif attack == 4:  # over the size bound
        payload = with_raw(payload, "padding", json.dumps("x" * (MAX_REPORT_BYTES + 10)).encode())
    elif attack == 5:  # an event for a rollout it is not in, or one that does not exist
        body = json.loads(payload)
        body.update(kind="rollout_event", version=1, step="committed", model="digits", at=1.0)
        body["rollout_id"] = rng.choice([RID, "nope", "r" * 200])
        topic, status = f"tether/{device}/rollout/events", False
        payload = json.dumps(body).encode()
    elif attack == 6:  # not a device topic
        topic = rng.choice(["tether//status", "other/x/status", "tether"])
    else:  # many values, shallow
        payload = with_raw(payload, "health", json.dumps({"l": [0] * 12_000}).encode())
    return Message(topic, payload, qos=1, retain=status)


@st.composite
def burst(draw: st.DrawFn) -> list[tuple[Message, dict[str, Any] | None]]:
    """50 messages, good statuses and events (with what they said) and hostile ones.

    Hypothesis picks each message's kind, attack and seed; the content is built from the
    seed (drawing every character through hypothesis would cost most of the run)."""
    out: list[tuple[Message, dict[str, Any] | None]] = []
    for _ in range(BURST):
        kind = draw(st.integers(0, 4))  # 3 in 5 good
        rng = random.Random(draw(st.integers(0, 2**32)))
        if kind in (0, 1):
            out.append(good_status(rng) if kind == 0 else good_event(rng))
        elif kind == 2:
            out.append(good_event(rng))
        else:
            out.append((hostile(rng, draw(st.integers(0, ATTACKS - 1))), None))
    return out


def deliver(controller: RolloutController, message: Message) -> None:
    if message.topic.endswith("/rollout/events"):
        controller._on_event(message)
    else:
        controller._on_status(message)


def check_recorded(db: FleetDB, messages: list[tuple[Message, dict[str, Any] | None]]) -> int:
    """Assert every good message of a burst is in the database; returns how many."""
    good = 0
    histories: dict[str, list[tuple[str, str, float]]] = {}
    for _message, body in messages:
        if body is None:
            continue
        good += 1
        if body["kind"] == "device_status":
            record = db.get_device(body["device"])
            assert record is not None, body
            assert record.agent_version == body["agent_version"] and record.online
            assert record.labels == body["labels"] and record.health == body["health"]
            assert set(record.models) == set(body["models"])
        else:
            device = body["device"]
            if device not in histories:
                histories[device] = db.device_history(RID, device)
            reason = truncate(body["reason"].replace("\x00", "\ufffd"), MAX_REASON_CHARS)
            assert (body["step"], reason) in {(s, r) for s, r, _ in histories[device]}, body
    return good


@pytest.fixture
def db(tmp_path: Path) -> Iterator[FleetDB]:
    """PostgreSQL: the stricter of the two (its text refuses NUL, its integers are 32-bit);
    the real-broker run below covers SQLite too."""
    database = open_db("postgresql", tmp_path)
    try:
        yield database
    finally:
        database.drop_schema()
        database.close()


def test_ten_thousand_generated_reports_through_the_intake(db: FleetDB) -> None:
    db.create_rollout(RID, "digits", 2, {}, policy(), [(d, 0, 1) for d in MEMBERS], 1.0)
    # Not started: the MQTT handlers and the recorder are driven here, in this thread.
    controller = RolloutController(
        db, MqttClient("mqtt://127.0.0.1:1", "unused"), signing_key=generate_key()
    )
    seen = {"messages": 0, "good": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(burst())
    def one_burst(messages: list[tuple[Message, dict[str, Any] | None]]) -> None:
        for message, _ in messages:
            deliver(controller, message)
        controller.record_pending()
        seen["good"] += check_recorded(db, messages)
        seen["messages"] += len(messages)
        assert controller.dropped["store_failed"] == 0, "the database refused a report"

    one_burst()
    print(seen, dict(controller.dropped))
    assert seen["messages"] >= 10_000 or EXAMPLES < 200
    assert seen["good"] > seen["messages"] / 2
    # Every hostile message was refused when read or ignored, never failed in the database.
    assert controller.dropped["invalid"] > seen["messages"] / 5
    assert controller.dropped["store_failed"] == 0 and controller.dropped["inbox_full"] == 0


@pytest.fixture(params=BACKENDS)
def fleet(request: pytest.FixtureRequest, broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    database = open_db(request.param, tmp_path)
    harness = Fleet(broker.url, database, tmp_path)
    try:
        yield harness
    finally:
        harness.close()
        database.drop_schema()
        database.close()


def test_generated_bursts_through_a_real_broker(fleet: Fleet) -> None:
    """A smaller run end to end: generated bursts published to Mosquitto, recorded by the
    started controller, which keeps serving."""
    fleet.db.create_rollout(RID, "digits", 2, {}, policy(), [(d, 0, 1) for d in MEMBERS], 1.0)
    assert fleet.db.set_rollout_state(RID, "paused", 1.0)  # record events, order nothing

    @settings(
        max_examples=4,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(burst())
    def one_burst(messages: list[tuple[Message, dict[str, Any] | None]]) -> None:
        for message, _ in messages:
            fleet.send(message.topic, message.payload, retain=message.retain)

        def recorded() -> bool:
            try:
                check_recorded(fleet.db, messages)
            except AssertionError:
                return False
            return True

        wait_for(recorded, 15, "every good message of the burst recorded")
        check_recorded(fleet.db, messages)

    one_burst()
    assert fleet.controller.dropped["store_failed"] == 0
    assert fleet.controller.dropped["invalid"] > 0
