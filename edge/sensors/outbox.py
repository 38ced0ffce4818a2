"""The persistent outbox: results waiting to be published and escalations waiting for the cloud.

SQLite in the agent's data directory (WAL; ``synchronous`` FULL by default). The bridge
stores a batch's results here, in one transaction, *before* it acknowledges the batch's
sensor messages, and deletes a result only after the broker's PUBACK for it; so a crash at
any moment loses nothing the broker delivered. Records leave in the order they came in.

The outbox is bounded by records and bytes. When full, the configured policy decides:
``drop_oldest`` deletes the oldest records to make room, ``refuse_new`` does not store the
new one. Either way each dropped record is counted (``counters``) and explained (``drops``:
kind, reading id, topic, reason), and reported to ``on_drop``.

It also remembers the keys of recently stored readings (``seen``), so a message the broker
redelivers after a crash between storing and acknowledging is not answered twice.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.sensors.results import Outgoing
from edge.sensors.settings import OutboxSettings

DropListener = Callable[[str, str, int], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, reading_id TEXT NOT NULL, correlation BLOB, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS escalations (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, version TEXT,
    topic TEXT NOT NULL, identity BLOB NOT NULL, request BLOB NOT NULL,
    header_length INTEGER, reading_id TEXT NOT NULL, correlation BLOB, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, reading_id TEXT NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: Explanations of the drops table kept (older ones go; the counters keep the totals).
DROPS_KEPT = 100_000


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
    """Results and escalations, durable, ordered and bounded (one SQLite file)."""

    def __init__(
        self,
        path: Path,
        settings: OutboxSettings | None = None,
        on_drop: DropListener | None = None,
    ) -> None:
        self.path = path
        self.settings = settings or OutboxSettings()
        self.on_drop = on_drop
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={self.settings.synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._tick = self._scalar("SELECT COALESCE(MAX(at), 0) FROM seen")
        self._count = self._scalar("SELECT COUNT(*) FROM results") + self._scalar(
            "SELECT COUNT(*) FROM escalations"
        )
        self._bytes = self._scalar("SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM results")
        self._bytes += self._scalar("SELECT COALESCE(SUM(LENGTH(request)), 0) FROM escalations")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _scalar(self, sql: str, *args: Any) -> int:
        row = self._db.execute(sql, args).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    # ------------------------------------------------------------------ writing

    def store(
        self,
        results: Sequence[Outgoing],
        escalations: Sequence[Escalation] = (),
        seen: Iterable[str] = (),
    ) -> int:
        """Store a batch's messages and reading keys in one durable transaction.

        Returns how many records the full-outbox policy dropped.
        """
        now = time.time()
        with self._lock, self._transaction():
            rows = []
            for key in seen:
                self._tick += 1
                rows.append((key, self._tick))
            self._db.executemany("INSERT OR REPLACE INTO seen (key, at) VALUES (?, ?)", rows)
            dropped = self._insert(results, escalations, now)
            if rows and self._tick // 1024 != (self._tick - len(rows)) // 1024:
                self._db.execute(
                    "DELETE FROM seen WHERE at <= ?", (self._tick - self.settings.dedupe_window,)
                )
        return dropped

    def _insert(
        self, results: Sequence[Outgoing], escalations: Sequence[Escalation], now: float
    ) -> int:
        dropped = 0
        refuse = self.settings.policy == "refuse_new"
        for item in results:
            if refuse and not self._room(len(item.payload)):
                self._explain(item.kind, item.reading_id, item.topic, "outbox_full_refused", now)
                dropped += 1
                continue
            self._db.execute(
                "INSERT INTO results (kind, topic, payload, reading_id, correlation, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (item.kind, item.topic, item.payload, item.reading_id, item.correlation, now),
            )
            self._count += 1
            self._bytes += len(item.payload)
        for esc in escalations:
            if refuse and not self._room(len(esc.request)):
                self._explain("escalation", esc.reading_id, esc.topic, "outbox_full_refused", now)
                dropped += 1
                continue
            self._db.execute(
                "INSERT INTO escalations (model, version, topic, identity, request, "
                "header_length, reading_id, correlation, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                ),
            )
            self._count += 1
            self._bytes += len(esc.request)
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
            self._count -= 1
            self._bytes -= int(row[5])
            self._explain(row[2], row[3], row[4], "outbox_full_oldest", now)
            dropped += 1
        return dropped

    def _explain(self, kind: str, reading_id: str, topic: str, reason: str, now: float) -> None:
        self._db.execute(
            "INSERT INTO drops (kind, reading_id, topic, reason, at) VALUES (?, ?, ?, ?, ?)",
            (kind, reading_id, topic, reason, now),
        )
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES (?, 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1",
            (f"dropped:{reason}",),
        )
        self._db.execute(
            "DELETE FROM drops WHERE id <= (SELECT MAX(id) FROM drops) - ?", (DROPS_KEPT,)
        )
        if self.on_drop is not None:
            self.on_drop(kind, reason, 1)

    def record_drop(self, kind: str, reading_id: str, topic: str, reason: str) -> None:
        """Count and explain a record dropped outside the outbox's own policy."""
        with self._lock, self._transaction():
            self._explain(kind, reading_id, topic, reason, time.time())

    # ------------------------------------------------------------------ results

    def peek_results(self, limit: int) -> list[StoredResult]:
        """The oldest ``limit`` results, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, topic, payload, reading_id, correlation FROM results "
                "ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [StoredResult(*row) for row in rows]

    def delete_results(self, seqs: Sequence[int]) -> None:
        """Forget results the broker acknowledged."""
        if not seqs:
            return
        with self._lock, self._transaction():
            for seq in seqs:
                row = self._db.execute(
                    "DELETE FROM results WHERE seq = ? RETURNING LENGTH(payload)", (seq,)
                ).fetchone()
                if row is not None:
                    self._count -= 1
                    self._bytes -= int(row[0])

    # ------------------------------------------------------------------ escalations

    def peek_escalations(self, limit: int) -> list[StoredEscalation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, model, version, topic, identity, request, header_length, "
                "reading_id, correlation FROM escalations ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [StoredEscalation(row[0], Escalation(*row[1:])) for row in rows]

    def complete_escalations(
        self, seqs: Sequence[int], corrections: Sequence[Outgoing], reason: str | None = None
    ) -> None:
        """Replace answered escalations by their corrections (or drop them for ``reason``)."""
        now = time.time()
        with self._lock, self._transaction():
            for seq in seqs:
                row = self._db.execute(
                    "DELETE FROM escalations WHERE seq = ? RETURNING LENGTH(request), "
                    "reading_id, topic",
                    (seq,),
                ).fetchone()
                if row is None:
                    continue
                self._count -= 1
                self._bytes -= int(row[0])
                if reason is not None:
                    self._explain("escalation", row[1], row[2], reason, now)
            self._insert(corrections, (), now)

    # ------------------------------------------------------------------ reading

    def seen(self, key: str) -> bool:
        """True when a reading with this key was stored recently."""
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone() is not None
            )

    def depth(self) -> int:
        return self._count

    def stats(self) -> OutboxStats:
        with self._lock:
            results = self._scalar("SELECT COUNT(*) FROM results")
            escalations = self._scalar("SELECT COUNT(*) FROM escalations")
            oldest = [
                row[0]
                for row in (
                    self._db.execute("SELECT created FROM results ORDER BY seq LIMIT 1").fetchone(),
                    self._db.execute(
                        "SELECT created FROM escalations ORDER BY seq LIMIT 1"
                    ).fetchone(),
                )
                if row is not None
            ]
            counters = self._db.execute(
                "SELECT name, value FROM counters WHERE name LIKE 'dropped:%'"
            ).fetchall()
        return OutboxStats(
            results=results,
            escalations=escalations,
            bytes=self._bytes,
            oldest_age_s=max(0.0, time.time() - min(oldest)) if oldest else 0.0,
            dropped={name.split(":", 1)[1]: int(value) for name, value in counters},
        )

    def drops(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest explained drops, newest last."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, reading_id, topic, reason, at FROM drops ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("kind", "reading_id", "topic", "reason", "at")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]

    # ------------------------------------------------------------------ plumbing

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
