"""Hostile device reports through the real intake: a real Mosquitto, the real controller.

One device's status or event must never cost other devices their reports (issue 12, items
2 and 7): a report that cannot be read or stored is dropped alone, logged and counted; the
good reports around it are recorded, the controller keeps serving, and a restart does not
trip over a retained hostile status again and again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cloud.fleet_db import FleetDB
from cloud.fleet_metrics import FleetMetrics
from cloud.rollout import RolloutController
from harness.broker import Broker
from harness.fleet import BACKENDS, FleetHarness, open_db, policy, wait_for
from shared.fleet import MAX_REASON_CHARS, DeviceStatus
from shared.mqtt import MqttClient

GOOD = 20


class Fleet(FleetHarness):
    """The harness plus a device-side client that publishes raw payloads."""

    def __init__(self, broker_url: str, db: FleetDB, tmp_path: Path) -> None:
        super().__init__(broker_url, db, tmp_path)
        self.sender = MqttClient(broker_url, f"hostile-{self.run}")
        self.sender.start()
        self.retained: list[str] = []

    def send(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sender.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        if retain:
            self.retained.append(topic)

    def status(self, device: str) -> None:
        self.send(f"tether/{device}/status", status(device, labels={"run": self.run}), retain=True)

    def known(self) -> set[str]:
        return {d.device for d in self.db.list_devices(self.sel())}

    def close(self) -> None:
        for topic in self.retained:  # the broker is shared by the session's tests
            self.sender.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.sender.stop()
        super().close()


@pytest.fixture(params=BACKENDS)
def fleet(request: pytest.FixtureRequest, fresh_broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    """A broker of the test's own: no other test's retained statuses reach the controller,
    so every drop it counts is one of this test's."""
    db = open_db(request.param, tmp_path)
    harness = Fleet(fresh_broker.url, db, tmp_path)
    try:
        yield harness
    finally:
        harness.close()
        db.drop_schema()
        db.close()


def nested(levels: int) -> bytes:
    """JSON text of objects nested ``levels`` deep (no encoder here would write it)."""
    return b'{"x":' * levels + b"1" + b"}" * levels


def with_raw(payload: bytes, field: str, raw: bytes) -> bytes:
    """``payload`` (a JSON object) with ``field`` set to the JSON text ``raw``."""
    return payload[:-1] + b', "' + field.encode() + b'": ' + raw + b"}"


def status(device: str, **fields: Any) -> bytes:
    body = {"kind": "device_status", "device": device, "online": True, "agent_version": "1"}
    body.update(fields)
    return json.dumps(body).encode()


def event(rollout_id: str, step: str, **fields: Any) -> bytes:
    body = {
        "kind": "rollout_event",
        "rollout_id": rollout_id,
        "model": "digits",
        "version": 2,
        "step": step,
        "at": time.time(),
        "health": {"requests": 100, "shadow_samples": 10, "shadow_agreement": 1.0},
    }
    body.update(fields)
    return json.dumps(body).encode()


def rollout_of(fleet: Fleet, devices: list[str]) -> str:
    """A paused rollout with ``devices`` ordered: the controller records their events and
    sends nothing (no published version needed)."""
    rid = f"r-{uuid.uuid4().hex[:8]}"
    assignments: list[tuple[str, int, int | None]] = [(d, 0, 1) for d in devices]
    fleet.db.create_rollout(rid, "digits", 2, fleet.sel(), policy(), assignments, 1.0)
    assert fleet.db.set_rollout_state(rid, "paused", 1.0)
    fleet.db.mark_devices(rid, devices, "ordered", 2.0, column="ordered_at")
    return rid


def committed(db: FleetDB, rid: str) -> set[str]:
    return {r.device for r in db.rollout_devices(rid) if r.step == "committed"}


def metrics(db: FleetDB) -> str:
    return FleetMetrics(db).render().decode()


def dropped(reason: str, count: int) -> str:
    return f'tether_fleet_reports_dropped_total{{reason="{reason}"}} {count}.0'


def test_a_hostile_status_costs_only_itself_and_not_after_a_restart(fleet: Fleet) -> None:
    bad = f"bad{fleet.run}"
    good = [f"g{fleet.run}-{i:02d}" for i in range(GOOD)]
    rid = rollout_of(fleet, good)
    # 1,020 levels: under orjson's limit, over every recursive encoder's; 6 KB.
    hostile = with_raw(status(bad, labels={"run": fleet.run}), "health", nested(1020))
    fleet.send(f"tether/{bad}/status", hostile, retain=True)
    for i, device in enumerate(good):
        fleet.status(device)
        fleet.send(f"tether/{device}/rollout/events", event(rid, "committed"))
        if i == GOOD // 2:  # hostile events among the good ones
            topic = f"tether/{device}/rollout/events"
            fleet.send(topic, with_raw(event(rid, "active"), "reason", nested(1020)))
            fleet.send(topic, event(rid, "active", version=2**40))
    wait_for(lambda: set(good) <= fleet.known(), 10, "every good status recorded")
    wait_for(lambda: committed(fleet.db, rid) == set(good), 10, "every committed event recorded")
    assert bad not in fleet.known()
    wait_for(lambda: dropped("invalid", 3) in metrics(fleet.db), 5, "3 drops on /metrics")
    assert fleet.controller.dropped["invalid"] == 3

    # The controller keeps serving: a new status is recorded.
    late = f"late{fleet.run}"
    fleet.status(late)
    wait_for(lambda: late in fleet.known(), 10, "a status after the hostile ones")

    # A restart gets the retained hostile status again: dropped once more, not in a loop,
    # and the retained good statuses are recorded again.
    fleet.controller.stop()
    again = RolloutController(fleet.db, fleet.mqtt, signing_key=fleet.key, tick_s=0.02)
    fleet.controller = again
    for device in good:
        fleet.db.upsert_device(device, DeviceStatus(online=False), 0.0)
    again.start()
    wait_for(
        lambda: all(d.online for d in fleet.db.list_devices(fleet.sel()) if d.device in good),
        10,
        "the retained good statuses recorded again",
    )
    wait_for(lambda: again.dropped["invalid"] == 1, 5, "the retained hostile status dropped")
    later = f"later{fleet.run}"
    fleet.status(later)
    wait_for(lambda: later in fleet.known(), 10, "a status after the restart")
    assert again.dropped["invalid"] == 1 and again.dropped["store_failed"] == 0
    assert bad not in fleet.known()


def test_a_report_that_fails_to_store_is_dropped_alone(fleet: Fleet) -> None:
    """A report the database refuses (here: a fault injected for one device) rolls back its
    batch; the others of that batch are stored one by one and the bad one is counted."""
    bad = f"bad{fleet.run}"
    good = [f"g{fleet.run}-{i:02d}" for i in range(GOOD)]
    rid = rollout_of(fleet, [bad, *good])
    original = fleet.db.upsert_devices

    def upsert(statuses: Sequence[tuple[str, DeviceStatus, float]]) -> None:
        if any(device == bad for device, _, _ in statuses):
            raise RuntimeError("the database refused this row")
        original(statuses)

    fleet.db.upsert_devices = upsert  # type: ignore[method-assign]
    # Holding the database makes the controller queue the reports, so the bad one lands in
    # a batch with good statuses and events.
    # The bad one goes in the middle: the intake thread may already hold the first reports
    # (taken before it found the database busy), so it can never be in a batch alone.
    with fleet.db.transaction():
        for i, device in enumerate(good):
            if i == GOOD // 2:
                fleet.status(bad)
            fleet.status(device)
            fleet.send(f"tether/{device}/rollout/events", event(rid, "committed"))
        wait_for(lambda: fleet.controller._inbox.qsize() >= GOOD, 10, "reports queued")
    wait_for(lambda: set(good) <= fleet.known(), 10, "every good status recorded")
    wait_for(lambda: committed(fleet.db, rid) == set(good), 10, "every committed event recorded")
    assert bad not in fleet.known()
    wait_for(lambda: fleet.controller.dropped["store_failed"] == 1, 5, "the bad report counted")
    wait_for(lambda: dropped("store_failed", 1) in metrics(fleet.db), 5, "the drop on /metrics")


def test_events_for_unknown_rollouts_leave_no_rows_and_reasons_are_cut(fleet: Fleet) -> None:
    device = f"g{fleet.run}"
    rid = rollout_of(fleet, [device])
    topic = f"tether/{device}/rollout/events"
    for i in range(50):  # a device inventing rollouts cannot grow the history table
        fleet.send(topic, event(f"made-up-{i}", "failed"))
    fleet.send(topic, event(rid, "failed", reason="why " * 10_000))
    wait_for(lambda: fleet.db.rollout_devices(rid)[0].step == "failed", 10, "the real event")
    wait_for(lambda: fleet.controller.dropped["unknown_rollout"] == 50, 10, "unknown counted")
    assert all(fleet.db.device_history(f"made-up-{i}", device) == [] for i in range(50))
    (row,) = fleet.db.rollout_devices(rid)
    assert len(row.reason) == MAX_REASON_CHARS and row.reason.startswith("why why")
    assert [r for _, r, _ in fleet.db.device_history(rid, device)] == [row.reason]
    wait_for(lambda: dropped("unknown_rollout", 50) in metrics(fleet.db), 5, "/metrics")


def test_a_full_inbox_drops_and_counts_instead_of_growing(fleet: Fleet) -> None:
    """With the database held, a controller with a 10-report inbox keeps 10 and counts the
    rest as dropped; once the database answers, it records what it kept and serves on."""
    fleet.controller.stop()
    small = RolloutController(
        fleet.db, fleet.mqtt, signing_key=fleet.key, tick_s=0.02, inbox_max_reports=10
    )
    fleet.controller = small
    small.start()
    devices = [f"g{fleet.run}-{i:02d}" for i in range(30)]
    with fleet.db.transaction():
        fleet.status(devices[0])
        # the recorder took the first report alone and waits for the database with it
        wait_for(lambda: small.received == 1 and small._inbox.qsize() == 0, 5, "recorder waits")
        for device in devices[1:]:
            fleet.status(device)
        wait_for(lambda: small.received == 30, 10, "every report received")
        assert small.dropped["inbox_full"] == 19 and small._inbox.qsize() == 10
    wait_for(lambda: len(fleet.known()) == 11, 10, "the kept ones recorded")
    wait_for(lambda: dropped("inbox_full", 19) in metrics(fleet.db), 5, "the drops on /metrics")
    late = f"late{fleet.run}"
    fleet.status(late)
    wait_for(lambda: late in fleet.known(), 10, "a status after the drops")
