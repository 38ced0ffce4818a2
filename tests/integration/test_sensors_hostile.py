"""Hostile sensor messages among good ones: each costs only itself, the bridge keeps serving.

A stock Mosquitto and ``python -m edge.bridge_cli`` serving ``digits-student``. Twenty
sensors publish 2,000 good readings; among them, 240 hostile messages: ``id``,
``timestamp`` or ``seq`` nested 300 and 1,000 levels deep, 100,000-character strings,
objects, arrays and booleans where a scalar belongs, a V2 request whose parameters nest
deep, a 60,000-character user property, payloads over the size limit. Before the fix, one such
message made the whole micro-batch fail forever (``orjson.dumps`` raising TypeError or
RecursionError), neither stored nor acknowledged, and a handful froze every sensor.
Now: every good reading gets its result, every hostile one its own ``invalid_input`` (or
``too_large``) error message naming the problem, and readings sent after all of that are
still answered.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.broker import Broker
from harness.sensor_stack import BridgeProcess, Collector
from models.digits import load_split
from shared.mqtt import MqttClient
from tests.conftest import REPOSITORY

DEVICE = "hostile-dev"
GOOD = 2000
SENSORS = 20

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-student" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)

CONFIG = """\
device_id = "{device}"
data_dir = "{data_dir}"
mqtt_url = "{url}"
repository = "{repository}"
models = ["digits-student"]

[runtime]
backend = "onnxruntime"
providers = ["CPUExecutionProvider"]

[sensors]
metrics_port = 0

[[sensors.bindings]]
model = "digits-student"

[sensors.batch]
max_messages = 64
max_delay_ms = 5
"""


def nested(depth: int) -> str:
    text = "1"
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k": {text}}}'
    return text


def hostile(k: int, row: list[float]) -> tuple[bytes, dict[str, object], str]:
    """The ``k``-th hostile message: payload, publish options and what its error must say."""
    data = json.dumps(row)
    bad_id = f"bad-{k:03d}"
    field = ["id", "timestamp", "seq", "ts"][k % 4]
    cases: list[tuple[str, str]] = [
        (nested(300), "must be a string, number or boolean"),
        (nested(1000), "must be a string, number or boolean"),
        (json.dumps("x" * 100_000), "100000 characters"),
        (json.dumps({"a": [1, 2]}), "got an object"),
        (json.dumps([1, 2, 3]), "got an array"),
        (json.dumps("\ud800"), "surrogate"),  # orjson refuses it as malformed JSON
    ]
    if k % 8 == 6:  # a V2 request whose parameters nest deep
        body = (
            f'{{"id": "{bad_id}", "parameters": {{"timestamp": {nested(500)}}}, "inputs": '
            f'[{{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": {data}}}]}}'
        )
        return body.encode(), {}, "parameters.timestamp"
    if k % 8 == 7:  # an id of 60,000 characters in a user property (MQTT allows 65,535)
        raw = json.dumps(row).encode()
        return raw, {"user_properties": {"id": "p" * 60_000}}, "60000 characters"
    value, expect = cases[k % len(cases)]
    if field == "id":
        # the reading id falls back to the correlation data when the payload's id is bad
        body = f'{{"id": {value}, "data": {data}}}'
        return body.encode(), {"correlation_data": bad_id.encode()}, expect
    body = f'{{"id": "{bad_id}", "{field}": {value}, "data": {data}}}'
    return body.encode(), {}, expect


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(tmp_path / "broker", stock=True).start()
    yield instance
    instance.stop()


def test_hostile_messages_cost_only_themselves(tmp_path: Path, broker: Broker) -> None:
    data_dir = tmp_path / "bridge"
    config = tmp_path / "bridge.toml"
    config.write_text(
        CONFIG.format(device=DEVICE, data_dir=data_dir, url=broker.url, repository=REPOSITORY)
    )
    collector = Collector(broker.url, DEVICE)
    collector.client.start()
    bridge = BridgeProcess(config, data_dir)
    bridge.start()
    bridge.wait_ready()
    rows = [row.tolist() for row in load_split("test")[0]]
    sensor = MqttClient(broker.url, f"sensors-{uuid.uuid4().hex[:6]}", max_inflight=1000)
    sensor.start()
    good: set[str] = set()
    bad: dict[str, str] = {}
    infos = []
    for i in range(GOOD):
        rid = f"g{i:05d}"
        good.add(rid)
        body = json.dumps({"id": rid, "seq": i, "data": rows[i % len(rows)]}).encode()
        infos.append(sensor.publish(f"tether/{DEVICE}/sensors/s{i % SENSORS}/data", body))
        if i % 8 == 3 and len(bad) < 240:
            k = len(bad)
            payload, options, expect = hostile(k, rows[k % len(rows)])
            bad[f"bad-{k:03d}"] = expect
            if "user_properties" not in options and "correlation_data" not in options:
                options["correlation_data"] = f"bad-{k:03d}".encode()
            if "user_properties" in options:
                options["correlation_data"] = f"bad-{k:03d}".encode()
            infos.append(sensor.publish(f"tether/{DEVICE}/sensors/bad/data", payload, **options))  # type: ignore[arg-type]
    # one over the size limit (1 MiB by default): not parsed, so its id is the correlation
    huge = json.dumps({"id": "bad-huge", "data": rows[0], "pad": "x" * 1_100_000}).encode()
    infos.append(
        sensor.publish(f"tether/{DEVICE}/sensors/bad/data", huge, correlation_data=b"bad-huge")
    )
    bad["bad-huge"] = "over the limit"
    for info in infos:
        info.wait_for_publish(60)

    def answered() -> bool:
        return good <= collector.ids("result") and set(bad) <= collector.ids("error")

    deadline = time.monotonic() + 120  # a loaded 2-core machine needs well under a third
    while time.monotonic() < deadline and not answered():
        assert bridge.alive(), bridge.log()
        time.sleep(0.2)
    errors = collector.of("error")
    missing_good = good - collector.ids("result")
    missing_bad = set(bad) - set(errors)
    assert not missing_good and not missing_bad, (
        f"{len(missing_good)} good and {len(missing_bad)} hostile unanswered, e.g. "
        f"{sorted(missing_good)[:3]} {sorted(missing_bad)[:3]}"
    )
    for rid, expect in bad.items():
        error = errors[rid][0]
        assert len(errors[rid]) == 1 and expect in error["error"], (rid, error["error"][:300])
        assert error["reason"] == ("too_large" if rid == "bad-huge" else "invalid_input")
        for key in ("seq", "timestamp", "reading_id"):  # only values that keep the rule
            assert error[key] is None or len(str(error[key])) <= 256
    assert all(len(bodies) == 1 for bodies in collector.of("result").values())
    assert not (good & set(errors)) and not (set(bad) & collector.ids("result"))

    # still serving: readings after all of that are answered
    after = {f"after-{i}" for i in range(50)}
    for rid in sorted(after):
        body = json.dumps({"id": rid, "data": rows[0]}).encode()
        sensor.publish(f"tether/{DEVICE}/sensors/s0/data", body).wait_for_publish(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not after <= collector.ids("result"):
        time.sleep(0.1)
    assert after <= collector.ids("result")

    # the intake drains (its rows go once their results are in the outbox) and nothing
    # was dropped; the stats file is a periodic snapshot, so wait for one that shows it
    def drained() -> dict[str, Any]:
        stats = bridge.stats() or {}
        return stats if stats.get("intake", {}).get("readings") == 0 else {}

    stats: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (stats := drained()):
        time.sleep(0.2)
    last = bridge.stats()
    assert bridge.stop() == 0, bridge.log()
    sensor.stop()
    collector.client.stop()
    assert stats, f"the intake never drained: {last}"
    assert stats["drops"] == {}
