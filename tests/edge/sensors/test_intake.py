"""The intake: durable arrival order per lane, micro-batches, bounds with both policies,
redeliveries skipped, answers replacing readings in one transaction."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edge.sensor_settings import IntakeSettings
from edge.sensors.database import SensorDatabase
from edge.sensors.intake import Intake
from edge.sensors.outbox import Outbox
from edge.sensors.results import Outgoing
from shared.mqtt import Message

STOP = threading.Event()


def reading(n: int, sensor: str = "s1", size: int = 10, dup: bool = False) -> Message:
    payload = f'{{"id": "r{n}", "data": [{n}]}}'.encode().ljust(size)
    return Message(topic=f"t/{sensor}/data", payload=payload, qos=1, dup=dup)


def take(intake: Intake, lane: str = "m@", n: int = 100) -> list[str]:
    batch = intake.next_batch(lane, max_messages=n, max_delay_s=0, stop=STOP, idle_s=0.05)
    return [r.message.payload.decode().split('"')[3] for r in batch]


def test_readings_survive_reopening_and_come_out_in_order_per_lane(tmp_path: Path) -> None:
    path = tmp_path / "bridge.sqlite3"
    intake = Intake(SensorDatabase(path))
    intake.add([(reading(1), "m@"), (reading(2), "other@"), (reading(3), "m@")])
    intake.add([(reading(4), "m@")])
    intake.database.close()
    reopened = Intake(SensorDatabase(path))
    assert reopened.depth() == 4 and reopened.depth("m@") == 3
    assert take(reopened, n=2) == ["r1", "r3"]
    assert take(reopened) == ["r4"]
    assert take(reopened, "other@") == ["r2"]
    assert take(reopened) == []


def test_a_batch_waits_for_more_readings_until_its_delay_is_up(tmp_path: Path) -> None:
    intake = Intake(SensorDatabase(tmp_path / "b.sqlite3"))
    intake.add([(reading(1), "m@")])
    started = time.monotonic()
    batch = intake.next_batch("m@", max_messages=4, max_delay_s=0.3, stop=STOP, idle_s=5)
    assert len(batch) == 1 and time.monotonic() - started >= 0.25
    intake.add([(reading(n), "m@") for n in range(2, 12)])
    full = intake.next_batch("m@", max_messages=4, max_delay_s=10, stop=STOP, idle_s=5)
    assert len(full) == 4  # a full batch does not wait


def test_answers_replace_their_readings_in_one_transaction(tmp_path: Path) -> None:
    database = SensorDatabase(tmp_path / "b.sqlite3")
    intake, outbox = Intake(database), Outbox(database)
    intake.add([(reading(1), "m@"), (reading(2), "m@")])
    batch = intake.next_batch("m@", max_messages=10, max_delay_s=0, stop=STOP)
    with pytest.raises(RuntimeError), database.transaction():
        intake.remove(batch)
        outbox.store([Outgoing("result", "t/out", b"{}", "r1")])
        raise RuntimeError("crash between the two")
    assert intake.depth() == 2 and outbox.depth() == 0  # rolled back together
    with database.transaction():
        intake.remove(batch)
        outbox.store([Outgoing("result", "t/out", b"{}", "r1")])
    assert intake.depth() == 0 and outbox.depth() == 1


def test_redeliveries_of_stored_messages_are_skipped(tmp_path: Path) -> None:
    intake = Intake(SensorDatabase(tmp_path / "b.sqlite3"))
    assert intake.add([(reading(1), "m@"), (reading(2), "m@")]).stored == 2
    added = intake.add([(reading(1, dup=True), "m@"), (reading(3, dup=True), "m@")])
    assert (added.stored, added.skipped) == (1, 1)  # r3 was never stored: a first delivery
    # the same bytes without DUP are a new reading (a sensor may repeat itself)
    assert intake.add([(reading(1), "m@")]).stored == 1
    assert intake.depth() == 4


def test_seen_messages_are_bounded_by_the_dedupe_window(tmp_path: Path) -> None:
    # synchronous "normal": a thousand commits without a thousand fsyncs
    database = SensorDatabase(tmp_path / "b.sqlite3", "normal")
    intake = Intake(database, IntakeSettings(dedupe_window=10))
    for n in range(1100):
        intake.add([(reading(n), "m@")])
    assert intake.add([(reading(1099, dup=True), "m@")]).skipped == 1
    assert intake.add([(reading(0, dup=True), "m@")]).stored == 1


def test_drop_oldest_drops_waiting_readings_never_those_being_inferred(tmp_path: Path) -> None:
    drops: list[tuple[str, str, int]] = []
    database = SensorDatabase(tmp_path / "b.sqlite3", on_drop=lambda *a: drops.append(a))
    intake = Intake(database, IntakeSettings(max_messages=3, policy="drop_oldest"))
    intake.add([(reading(n), "m@") for n in (1, 2)])
    assert take(intake, n=1) == ["r1"]  # r1 is being inferred
    added = intake.add([(reading(n), "m@") for n in (3, 4, 5)])
    assert (added.stored, added.dropped) == (2, 2) and intake.depth() == 3
    assert take(intake) == ["r4", "r5"]  # r2 (waiting), then r3 (of this group) made room
    assert [d["reading_id"] for d in database.drops()] == ["r2", "r3"]
    assert {d["reason"] for d in database.drops()} == {"intake_full_oldest"}
    assert database.dropped() == {"intake_full_oldest": 2}
    assert drops == [("reading", "intake_full_oldest", 1)] * 2


def test_refuse_new_keeps_the_oldest_and_bytes_bound_too(tmp_path: Path) -> None:
    database = SensorDatabase(tmp_path / "b.sqlite3")
    settings = IntakeSettings(max_messages=100, max_bytes=2048, policy="refuse_new")
    intake = Intake(database, settings)
    added = intake.add([(reading(n, size=900), "m@") for n in (1, 2, 3)])
    assert (added.stored, added.dropped) == (2, 1)
    assert take(intake) == ["r1", "r2"]
    assert database.drops()[0]["reading_id"] == "r3"
    assert database.dropped() == {"intake_full_refused": 1}


def test_relane_moves_readings_to_their_new_binding_and_drops_unbound_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "b.sqlite3"
    intake = Intake(SensorDatabase(path))
    intake.add([(reading(1, "a"), "old@"), (reading(2, "b"), "old@"), (reading(3, "a"), "m@")])
    intake.database.close()
    intake = Intake(SensorDatabase(path))
    dropped = intake.relane({"m@"}, lambda topic: "m@" if "/a/" in topic else None)
    assert dropped == 1 and take(intake) == ["r1", "r3"]
    assert intake.database.drops()[0]["reason"] == "unbound"
