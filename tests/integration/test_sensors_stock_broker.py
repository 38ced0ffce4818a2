"""A burst of 20,000 readings on a stock Mosquitto, every one escalated: nothing is lost.

A stock Mosquitto 2.0 (only ``listener`` and ``allow_anonymous``: at most 1000 messages
queued per client) as the device broker, another as the cloud broker, a real cloud worker
serving ``digits-teacher`` on it, and ``python -m edge.bridge_cli`` serving the ``digits``
cascade. One client publishes 20,000 QoS 1 readings as fast as it can, all of them
inputs the student is unsure of (so every reading is escalated), plus 10 malformed ones.
The bridge acknowledges a reading once it is stored in its intake, so the broker's queue
never overflows: every reading gets exactly one result (or a counted, explained drop),
the malformed ones get error messages, and each sensor's results come in the order of its
readings. The second run kills the cloud broker while the bridge works through the burst
(from its 2,000th answer to its 1,000th degraded one, by its own counts): those readings
are answered ``degraded`` and later corrected.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.broker import Broker
from harness.sensor_stack import (
    BridgeProcess,
    CloudWorkerProcess,
    Collector,
    unsure_rows,
    write_cascade_config,
)
from shared.mqtt import MqttClient
from tests.conftest import REPOSITORY

DEVICE = "burst-dev"
SENSORS = 50
READINGS = 20_000
MALFORMED = 10
THRESHOLD = 0.7

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / "digits-teacher" / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)


@pytest.fixture
def stock_brokers(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    device = Broker(tmp_path / "device-broker", stock=True).start()
    cloud = Broker(tmp_path / "cloud-broker", stock=True).start()
    yield device, cloud
    device.stop()
    cloud.stop()


@pytest.fixture
def cloud_worker(
    tmp_path: Path, stock_brokers: tuple[Broker, Broker]
) -> Iterator[CloudWorkerProcess]:
    """``tether cloud`` in a process of its own (the test process publishes and collects)."""
    worker = CloudWorkerProcess(stock_brokers[1].url, ["digits-teacher"], tmp_path / "cloud.log")
    worker.start().wait_ready()
    yield worker
    worker.stop()


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def malformed(k: int) -> tuple[str, bytes]:
    """The ``k``-th malformed reading and its id (sent as correlation data)."""
    bad_id = f"bad-{k:02d}"
    payloads = [
        b'{"id": "' + bad_id.encode() + b'", "data": [1, 2,',
        json.dumps({"id": bad_id, "data": [1.0] * 63}).encode(),
        json.dumps({"id": bad_id, "data": ["a"] * 64}).encode(),
        json.dumps({"id": bad_id, "seq": [[[1]]], "data": [0.0] * 64}).encode(),
        b"\x00" * 10,
    ]
    return bad_id, payloads[k % len(payloads)]


@pytest.mark.parametrize("outage", [False, True], ids=["cloud-up", "cloud-broker-killed"])
def test_a_burst_of_escalated_readings_on_a_stock_broker_loses_nothing(
    tmp_path: Path,
    stock_brokers: tuple[Broker, Broker],
    cloud_worker: CloudWorkerProcess,
    outage: bool,
) -> None:
    device, cloud = stock_brokers
    data_dir = tmp_path / "bridge"
    config = write_cascade_config(
        tmp_path / "bridge.toml",
        device=DEVICE,
        data_dir=data_dir,
        device_url=device.url,
        cloud_url=cloud.url,
        threshold=THRESHOLD,
    )
    collector = Collector(device.url, DEVICE)
    collector.client.start()
    bridge = BridgeProcess(config, data_dir)
    bridge.start()
    bridge.wait_ready()
    rows = unsure_rows(THRESHOLD)
    payloads = [
        json.dumps(
            {"id": f"s{i % SENSORS:02d}-{i // SENSORS:05d}", "seq": i // SENSORS, "data": row}
        ).encode()
        for i, row in enumerate(rows[i % len(rows)].tolist() for i in range(READINGS))
    ]
    expected = {f"s{i % SENSORS:02d}-{i // SENSORS:05d}" for i in range(READINGS)}
    bad_ids: set[str] = set()

    publisher = MqttClient(device.url, f"sensors-{uuid.uuid4().hex[:6]}", max_inflight=1000)
    publisher.start()
    events: list[str] = []
    started = time.monotonic()
    infos = []

    def degraded() -> set[str]:
        return {
            rid
            for rid, bodies in collector.of("result").items()
            if bodies[0]["parameters"]["route"] == "degraded"
        }

    failed: list[BaseException] = []

    def answered() -> int:
        """Readings the bridge has answered, by its own figures (written every second):
        results published plus results stored for publishing."""
        stats = bridge.stats() or {}
        sent = int((stats.get("results_out") or {}).get("result", 0))
        return sent + int((stats.get("outbox") or {}).get("results", 0))

    def degraded_by_bridge() -> int:
        return int((bridge.stats() or {}).get("degraded", 0))

    def outage_during_the_burst() -> None:
        """Kill the cloud broker once the bridge has answered 2,000 readings, while the
        test is still publishing the burst, and start it again once it has answered 1,000
        without the cloud (each one a correction to send once it is back). The bridge's
        own counts say when: it answers faster than a stock broker takes its results (20
        QoS 1 messages in flight), so the results the test's subscriber has seen, or the
        bridge has sent, can lag its answers by the whole burst; and a fixed count of
        results could come before any escalation (those in flight) or long after (every one
        waits its deadline)."""
        try:
            wait_for(lambda: answered() >= 2000, 120)
            cloud.kill()
            events.append(f"cloud broker killed at {time.monotonic() - started:.1f}s")
            wait_for(lambda: degraded_by_bridge() >= 1000, 120)
            cloud.start()
            events.append(f"cloud broker restarted at {time.monotonic() - started:.1f}s")
        except BaseException as exc:  # re-raised in the test's thread
            failed.append(exc)

    watcher = threading.Thread(target=outage_during_the_burst, daemon=True)
    if outage:
        watcher.start()
    for i, payload in enumerate(payloads):
        infos.append(
            publisher.publish(f"tether/{DEVICE}/sensors/s{i % SENSORS:02d}/data", payload, qos=1)
        )
        if i % (READINGS // MALFORMED) == 1000:
            bad_id, bad = malformed(len(bad_ids))
            bad_ids.add(bad_id)
            infos.append(
                publisher.publish(
                    f"tether/{DEVICE}/sensors/bad/data",
                    bad,
                    qos=1,
                    correlation_data=bad_id.encode(),
                )
            )

    if outage:  # the cloud broker is away while the bridge works through the burst
        watcher.join(250)
        assert not watcher.is_alive(), "the outage did not end"
        if failed:
            raise failed[0]
    for info in infos:
        info.wait_for_publish(60)
    published_s = time.monotonic() - started

    def corrections_out() -> int:
        return int(((bridge.stats() or {}).get("results_out") or {}).get("correction", 0))

    # Corrections count as sent once the broker acknowledged them (the bridge's own count):
    # a stock Mosquitto sends a subscriber 20 QoS 1 messages at a time and drops what queues
    # past 1000 behind them, so a burst of ~16,000 corrections can outrun a test process
    # sharing two cores with others. That loss is the subscriber's, not the bridge's.
    def settled() -> bool:
        return (
            expected <= collector.ids("result")
            and bad_ids <= collector.ids("error")
            and corrections_out() >= len(degraded())
        )

    # A quiet 2-core machine answers the burst in ~15 s, corrections of ~16,000 degraded
    # readings included; three test processes on it made the corrections ~15x slower
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not settled():
        time.sleep(0.25)
    done_s = time.monotonic() - started
    stats = bridge.stats() or {}
    assert bridge.stop() == 0, bridge.log()
    collector.client.stop()
    publisher.stop()

    with sqlite3.connect(data_dir / "sensors" / "outbox.sqlite3") as db:
        drops = db.execute("SELECT kind, reading_id, reason FROM drops").fetchall()
    results = collector.of("result")
    # A stock Mosquitto queues at most 1000 messages for a subscriber and drops the rest
    # (it logs so): on a loaded machine the test's own subscriber can fall that far
    # behind. That loss is the subscriber's; the bridge's figure is what the broker took
    # from it (every result PUBACKed), so then its own count must show every reading.
    broker_log = "".join(p.read_text() for p in device.workdir.glob("mosquitto-*.log"))
    subscriber_dropped = "Outgoing messages are being dropped for client collector" in broker_log
    sent = (stats.get("results_out") or {}) if stats else {}
    if subscriber_dropped:
        assert sent.get("result") == READINGS and sent.get("error") == MALFORMED, stats
        expected = set(results)  # what reached the subscriber is checked as usual below
        bad_ids &= collector.ids("error")
    missing = expected - set(results) - {row[1] for row in drops}
    summary = (
        f"{READINGS} readings + {MALFORMED} malformed published in {published_s:.1f}s, "
        f"settled after {done_s:.1f}s; results {len(results)}, errors "
        f"{len(collector.ids('error'))}, corrections {len(collector.ids('correction'))}, "
        f"degraded {len(degraded())}; drops {len(drops)}; {'; '.join(events)}"
    )
    print(summary)
    assert not missing, f"{len(missing)} readings lost, e.g. {sorted(missing)[:5]}: {summary}"
    assert not drops, f"the default intake and outbox hold the whole burst: {drops[:5]}"
    # exactly one result per reading (nothing crashed, so not even byte-identical copies)
    assert all(len(bodies) == 1 for bodies in results.values()), summary
    # every reading reached the bridge once: none was dropped or duplicated by the broker
    assert stats.get("messages_in") == READINGS + MALFORMED, stats
    errors = collector.of("error")
    for bad_id in bad_ids:
        assert errors[bad_id][0]["reason"] == "invalid_input" and errors[bad_id][0]["error"]
    if "bad-03" in bad_ids:
        assert "seq" in errors["bad-03"][0]["error"]  # the identity rule names the field
    routes = {bodies[0]["parameters"]["route"] for bodies in results.values()}
    if outage:
        assert routes == {"escalated", "degraded"}, routes
        assert corrections_out() == len(degraded()), summary  # one for each, no more
        fixes = collector.of("correction")
        assert fixes and set(fixes) <= degraded()
        for bodies in fixes.values():  # each one the subscriber got comes from the cloud
            assert len(bodies) == 1 and bodies[0]["parameters"]["served_by"] == "cloud"
    else:
        assert routes == {"escalated"}, routes  # every reading went to the cloud
        assert not collector.ids("correction")
    for rid in list(results)[:100]:
        body = results[rid][0]
        assert body["parameters"]["confidence"] < THRESHOLD and body["reading_id"] == rid
    # each sensor's results come in the order of its readings
    by_sensor: dict[str, list[int]] = {}
    for sensor, kind, seq in collector.arrival_order():
        if kind == "result" and sensor != "bad":
            by_sensor.setdefault(sensor, []).append(seq)
    assert all(seqs == sorted(seqs) for seqs in by_sensor.values())
    assert sum(len(s) for s in by_sensor.values()) == len(expected)
