"""The persistent outbox: results waiting to be published and escalations waiting for the cloud.

Tables in the bridge's SQLite file (:class:`~edge.sensors.database.SensorDatabase`). The
bridge stores a batch's results here in the transaction that takes the batch's readings
out of the intake, and deletes a result only after the broker's PUBACK for it; so a crash
at any moment loses nothing the broker delivered. Records leave in the order they came in.

The outbox is bounded by records and bytes. When full, the configured policy decides:
``drop_oldest`` deletes the oldest records to make room, ``refuse_new`` does not store the
new one. Either way each dropped record is counted (``counters``) and explained (``drops``:
kind, reading id, topic, reason), and reported to ``on_drop``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.sensor_settings import OutboxSettings
from edge.sensors.database import DropListener, SensorDatabase, insert_rows
from edge.sensors.results import Outgoing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, reading_id TEXT NOT NULL, correlation BLOB, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS escalations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT,
    topic TEXT NOT NULL, identity BLOB NOT NULL, request BLOB NOT NULL,
    header_length INTEGER, reading_id TEXT NOT NULL, correlation BLOB, created REAL NOT NULL);
"""


@dataclass(frozen=True)
class Escalation:
    """Rows the cloud should answer later; its answer becomes a correction on ``topic``."""

    model: str
    version: str | None
    topic: str
    identity: bytes
    request: bytes
    header_length: int | None
    reading_id: str
    correlation: bytes | None = None


@dataclass(frozen=True)
class StoredResult:
    """A result in the outbox, in publishing order."""

    seq: int
    kind: str
    topic: str
    payload: bytes
    reading_id: str
    correlation: bytes | None


@dataclass(frozen=True)
class StoredEscalation:
    """An escalation in the outbox, in order."""

    seq: int
    escalation: Escalation


@dataclass
class OutboxStats:
    """Depth, size, age and drops of the outbox."""

    results: int = 0
    escalations: int = 0
    bytes: int = 0
    oldest_age_s: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "escalations": self.escalations,
            "bytes": self.bytes,
            "oldest_age_s": round(self.oldest_age_s, 3),
            "dropped": dict(self.dropped),
        }


class Outbox:
    """Results and escalations, durable, ordered and bounded."""

    def __init__(
        self,
        database: SensorDatabase | Path,
        settings: OutboxSettings | None = None,
        on_drop: DropListener | None = None,
    ) -> None:
        self.settings = settings or OutboxSettings()
        if isinstance(database, Path):
            database = SensorDatabase(database, self.settings.synchronous, on_drop)
        self.database = database
        self._db = database.db
        database.db.executescript(_SCHEMA)
        database.on_rollback(self._recount)
        self._recount()

    def _recount(self) -> None:
        scalar = self.database.scalar
        self._results = scalar("SELECT COUNT(*) FROM results")
        self._escalations = scalar("SELECT COUNT(*) FROM escalations")
        self._bytes = scalar("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM results")
        self._bytes += scalar("SELECT COALESCE(SUM(LENGTH(request)), 0) FROM escalations")

    @property
    def _count(self) -> int:
        return self._results + self._escalations

    def close(self) -> None:
        self.database.close()

    # ------------------------------------------------------------------ writing

    def store(self, results: Sequence[Outgoing], escalations: Sequence[Escalation] = ()) -> int:
        """Store a batch's messages in one durable transaction (or the caller's).

        Returns how many records the full-outbox policy dropped.
        """
        with self.database.transaction():
            return self._insert(results, escalations, time.time())

    def _insert(
        self, results: Sequence[Outgoing], escalations: Sequence[Escalation], now: float
    ) -> int:
        dropped = 0
        refuse = self.settings.policy == "refuse_new"
        rows: list[tuple[Any, ...]] = []
        for item in results:
            if refuse and not self._room(len(item.payload)):
                self._explain(item.kind, item.reading_id, item.topic, "outbox_full_refused", now)
                dropped += 1
                continue
            rows.append(
                (item.kind, item.topic, item.payload, item.reading_id, item.correlation, now)
            )
            self._results += 1
            self._bytes += len(item.payload)
        insert_rows(
            self._db,
            "results",
            ("kind", "topic", "payload", "reading_id", "correlation", "created"),
            rows,
        )
        rows = []
        for esc in escalations:
            if refuse and not self._room(len(esc.request)):
                self._explain("escalation", esc.reading_id, esc.topic, "outbox_full_refused", now)
                dropped += 1
                continue
            rows.append(
                (
                    esc.model,
                    esc.version,
                    esc.topic,
                    esc.identity,
                    esc.request,
                    esc.header_length,
                    esc.reading_id,
                    esc.correlation,
                    now,
                )
            )
            self._escalations += 1
            self._bytes += len(esc.request)
        insert_rows(
            self._db,
            "escalations",
            (
                "model",
                "version",
                "topic",
                "identity",
                "request",
                "header_length",
                "reading_id",
                "correlation",
                "created",
            ),
            rows,
        )
        if not refuse:
            dropped += self._evict_oldest(now)
        return dropped

    def _room(self, size: int) -> bool:
        return (
            self._count + 1 <= self.settings.max_messages
            and self._bytes + size <= self.settings.max_bytes
        )

    def _over(self) -> bool:
        return self._count > self.settings.max_messages or self._bytes > self.settings.max_bytes

    def _evict_oldest(self, now: float) -> int:
        dropped = 0
        while self._over():
            result = self._db.execute(
                "SELECT seq, created, kind, reading_id, topic, LENGTH(payload) FROM results "
                "ORDER BY seq LIMIT 1"
            ).fetchone()
            esc = self._db.execute(
                "SELECT seq, created, 'escalation', reading_id, topic, LENGTH(request) "
                "FROM escalations ORDER BY seq LIMIT 1"
            ).fetchone()
            if result is None and esc is None:
                break
            table, row = (
                ("results", result)
                if esc is None or (result is not None and result[1] <= esc[1])
                else ("escalations", esc)
            )
            self._db.execute(f"DELETE FROM {table} WHERE seq = ?", (row[0],))
            if table == "results":
                self._results -= 1
            else:
                self._escalations -= 1
            self._bytes -= int(row[5])
            self._explain(row[2], row[3], row[4], "outbox_full_oldest", now)
            dropped += 1
        return dropped

    def _explain(self, kind: str, reading_id: str, topic: str, reason: str, now: float) -> None:
        self.database.explain(kind, reading_id, topic, reason, now)

    def record_drop(self, kind: str, reading_id: str, topic: str, reason: str) -> None:
        """Count and explain a record dropped outside the outbox's own policy."""
        self.database.explain(kind, reading_id, topic, reason)

    # ------------------------------------------------------------------ results

    def peek_results(self, limit: int) -> list[StoredResult]:
        """The oldest ``limit`` results, in order."""
        rows = self.database.read(
            "SELECT seq, kind, topic, payload, reading_id, correlation FROM results "
            "ORDER BY seq LIMIT ?",
            limit,
        )
        return [StoredResult(*row) for row in rows]

    def delete_results(self, seqs: Sequence[int]) -> None:
        """Forget results the broker acknowledged."""
        if not seqs:
            return
        with self.database.transaction() as db:
            for start in range(0, len(seqs), 900):
                chunk = list(seqs[start : start + 900])
                marks = ", ".join("?" for _ in chunk)
                count, size = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM results "
                    f"WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                db.execute(f"DELETE FROM results WHERE seq IN ({marks})", chunk)
                self._results -= int(count)
                self._bytes -= int(size)

    # ------------------------------------------------------------------ escalations

    def peek_escalations(self, limit: int) -> list[StoredEscalation]:
        """The oldest ``limit`` escalations, in order."""
        if self._escalations <= 0:
            return []
        rows = self.database.read(
            "SELECT seq, model, version, topic, identity, request, header_length, "
            "reading_id, correlation FROM escalations ORDER BY seq LIMIT ?",
            limit,
        )
        return [StoredEscalation(row[0], Escalation(*row[1:])) for row in rows]

    def complete_escalations(
        self, seqs: Sequence[int], corrections: Sequence[Outgoing], reason: str | None = None
    ) -> None:
        """Replace answered escalations by their corrections (or drop them for ``reason``)."""
        now = time.time()
        with self.database.transaction() as db:
            for start in range(0, len(seqs), 900):
                chunk = list(seqs[start : start + 900])
                marks = ", ".join("?" for _ in chunk)
                count, size = db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(LENGTH(request)), 0) FROM escalations "
                    f"WHERE seq IN ({marks})",
                    chunk,
                ).fetchone()
                if reason is not None:
                    for reading_id, topic in db.execute(
                        f"SELECT reading_id, topic FROM escalations WHERE seq IN ({marks})", chunk
                    ).fetchall():
                        self._explain("escalation", reading_id, topic, reason, now)
                db.execute(f"DELETE FROM escalations WHERE seq IN ({marks})", chunk)
                self._escalations -= int(count)
                self._bytes -= int(size)
            self._insert(corrections, (), now)

    # ------------------------------------------------------------------ reading

    def depth(self) -> int:
        return self._count

    def stats(self) -> OutboxStats:
        oldest = [
            rows[0][0]
            for rows in (
                self.database.read("SELECT created FROM results ORDER BY seq LIMIT 1"),
                self.database.read("SELECT created FROM escalations ORDER BY seq LIMIT 1"),
            )
            if rows
        ]
        return OutboxStats(
            results=self._results,
            escalations=self._escalations,
            bytes=self._bytes,
            oldest_age_s=max(0.0, time.time() - min(oldest)) if oldest else 0.0,
            dropped=self.database.dropped(),
        )

    def drops(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest explained drops (of the intake's too), newest last."""
        return self.database.drops(limit)
