"""The outbox: durable order, delete after delivery, bounds with both policies."""

from __future__ import annotations

from pathlib import Path

from edge.sensor_settings import OutboxSettings
from edge.sensors.outbox import Escalation, Outbox
from edge.sensors.results import Outgoing


def result(n: int, size: int = 10) -> Outgoing:
    return Outgoing("result", f"t/{n}", bytes([n % 256]) * size, f"r{n}")


def escalation(n: int) -> Escalation:
    return Escalation("digits", None, f"t/{n}", b"{}", b"x" * 10, None, f"e{n}")


def test_results_survive_reopening_in_order_and_leave_after_delivery(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    outbox = Outbox(path)
    outbox.store([result(1), result(2)])
    outbox.store([result(3)])
    outbox.close()
    reopened = Outbox(path)
    rows = reopened.peek_results(10)
    assert [r.reading_id for r in rows] == ["r1", "r2", "r3"]
    reopened.delete_results([rows[0].seq, rows[1].seq])
    assert [r.reading_id for r in reopened.peek_results(10)] == ["r3"]
    assert reopened.depth() == 1 and reopened.stats().results == 1


def test_drop_oldest_keeps_the_newest_and_explains_every_drop(tmp_path: Path) -> None:
    drops: list[tuple[str, str, int]] = []
    settings = OutboxSettings(max_messages=3, policy="drop_oldest")
    outbox = Outbox(tmp_path / "o.sqlite3", settings, on_drop=lambda *a: drops.append(a))
    outbox.store([result(1), result(2)])
    outbox.store([], [escalation(3)])
    assert outbox.store([result(4), result(5)]) == 2
    assert [r.reading_id for r in outbox.peek_results(10)] == ["r4", "r5"]
    assert [e.escalation.reading_id for e in outbox.peek_escalations(10)] == ["e3"]
    assert drops == [("result", "outbox_full_oldest", 1)] * 2
    assert outbox.stats().dropped == {"outbox_full_oldest": 2}
    assert [d["reading_id"] for d in outbox.drops()] == ["r1", "r2"]


def test_refuse_new_keeps_the_oldest(tmp_path: Path) -> None:
    settings = OutboxSettings(max_messages=100, max_bytes=1024, policy="refuse_new")
    outbox = Outbox(tmp_path / "o.sqlite3", settings)
    assert outbox.store([result(1, 600), result(2, 600)]) == 1
    assert [r.reading_id for r in outbox.peek_results(10)] == ["r1"]
    assert outbox.drops()[0]["reason"] == "outbox_full_refused"
    assert outbox.stats().dropped == {"outbox_full_refused": 1}


def test_escalations_become_corrections_in_one_step(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3")
    outbox.store([], [escalation(1), escalation(2)])
    first, second = outbox.peek_escalations(10)
    outbox.complete_escalations([first.seq], [Outgoing("correction", "t/1", b"{}", "e1")])
    assert [e.seq for e in outbox.peek_escalations(10)] == [second.seq]
    assert [r.kind for r in outbox.peek_results(10)] == ["correction"]
    outbox.complete_escalations([second.seq], [], reason="cloud_rejected:invalid_input")
    assert outbox.peek_escalations(10) == []
    assert outbox.stats().dropped == {"cloud_rejected:invalid_input": 1}
