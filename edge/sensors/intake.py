"""The durable intake: a reading the broker delivered is stored here before it is acknowledged.

A table in the bridge's SQLite file (:class:`~edge.sensors.database.SensorDatabase`). The
receiver stores each group of delivered messages in one transaction and only then sends
their PUBACKs; a batch's readings leave the intake in the transaction that stores their
answers in the outbox. So the intake, not the broker's queue, absorbs bursts and slow
models, and a crash at any moment loses nothing acknowledged.

Readings wait in *lanes* (one per model and version a binding names), handed out in
arrival order by :meth:`Intake.next_batch` as micro-batches: a batch closes at
``max_messages`` readings or ``max_delay`` after its first reading was stored.

The intake is bounded by readings and bytes. When full, the policy decides:
``drop_oldest`` deletes the oldest readings still waiting (not those being inferred) to
make room, ``refuse_new`` does not store the new one. Either way the message is
acknowledged, and each dropped reading is counted and explained (kind ``reading``, its
reading id, topic and reason) in the same drops table as the outbox's.

It also remembers a digest of recently stored messages (``seen``), so a message the broker
redelivers (DUP set) after a crash between storing and acknowledging is not stored twice.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge.sensor_settings import IntakeSettings
from edge.sensors.database import SensorDatabase, delete_ids, insert_rows
from edge.sensors.identity import best_effort_fields, identify
from shared.mqtt import Message

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS intake (
    id INTEGER PRIMARY KEY AUTOINCREMENT, lane TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, correlation BLOB, content_type TEXT, properties BLOB,
    received REAL NOT NULL);
CREATE INDEX IF NOT EXISTS intake_lane ON intake (lane, id);
CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS seen_at ON seen (at);
"""

_COLUMNS = "id, lane, topic, payload, correlation, content_type, properties, received"


@dataclass(frozen=True)
class StoredReading:
    """A reading in the intake: its row id, lane and the message as the broker delivered it."""

    id: int
    lane: str
    message: Message
    received: float


@dataclass
class Added:
    """What one :meth:`Intake.add` did with its messages."""

    stored: int = 0
    #: Redeliveries of messages already stored (acknowledged, not stored again).
    skipped: int = 0
    #: Readings the full policy dropped: new ones refused, or older ones to make room.
    dropped: int = 0


@dataclass
class _LaneState:
    #: Readings stored and not yet handed out (rows with ids above ``cursor``).
    pending: int = 0
    #: Highest row id handed out; rows up to it are being inferred.
    cursor: int = 0
    #: ``time.monotonic()`` when the oldest waiting reading was stored (its batch's start).
    since: float = 0.0
    #: Row ids handed out and not yet answered.
    taken: set[int] = field(default_factory=set)
    #: Row ids above ``cursor`` being dropped by the full policy (takers skip them).
    evicted: set[int] = field(default_factory=set)
    #: Serialises takes, so batches are handed out in arrival order.
    take: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Pending:
    """A message of the group being stored, not yet inserted."""

    message: Message
    lane: str
    key: str


def message_key(message: Message) -> str:
    """A digest of what makes a redelivered message the same message."""
    digest = hashlib.sha256()
    for part in (
        message.topic.encode("utf-8", "surrogatepass"),
        message.payload,
        message.correlation_data or b"",
        _properties(message),
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()[:32]


def reading_id_of(message: Message) -> str:
    """The reading id of a message, as well as it can be told without decoding it."""
    return identify(message, best_effort_fields(message.payload)).reading_id


class Intake:
    """Delivered readings, durable, in arrival order per lane, bounded.

    Writes go through the database's transactions; takes read committed rows through its
    reader connection, so a worker never waits for a commit being flushed. Locks: a
    lane's ``take`` lock before ``_ready``; ``_ready`` is held only briefly, never while
    waiting for the database.
    """

    def __init__(self, database: SensorDatabase, settings: IntakeSettings | None = None) -> None:
        self.database = database
        self.settings = settings or IntakeSettings()
        self._db = database.db
        database.db.executescript(_SCHEMA)
        self._ready = threading.Condition(threading.Lock())
        self._lanes: dict[str, _LaneState] = {}
        self._tick = database.scalar("SELECT COALESCE(MAX(at), 0) FROM seen")
        self._count = 0
        self._bytes = 0
        self._recount()
        database.on_rollback(self._recount)

    def _recount(self) -> None:
        """Counts from the table (at start and after a rollback).

        After a rolled-back eviction, a reading a worker skipped as evicted stays in the
        table, and is answered after the next start.
        """
        with self.database.lock:
            self._count = self.database.scalar("SELECT COUNT(*) FROM intake")
            self._bytes = self.database.scalar(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM intake"
            )
            with self._ready:
                cursors = {lane: state.cursor for lane, state in self._lanes.items()}
            lanes = [row[0] for row in self._db.execute("SELECT DISTINCT lane FROM intake")]
            counts = {
                lane: self.database.scalar(
                    "SELECT COUNT(*) FROM intake WHERE lane = ? AND id > ?",
                    lane,
                    cursors.get(lane, 0),
                )
                for lane in lanes
            }
            with self._ready:
                for lane, state in self._lanes.items():
                    state.pending = counts.pop(lane, 0)
                    state.evicted.clear()
                for lane, count in counts.items():
                    self._lanes[lane] = _LaneState(pending=count)

    # ------------------------------------------------------------------ storing

    def add(self, items: Sequence[tuple[Message, str]], now: float | None = None) -> Added:
        """Store delivered messages (with their lanes) in one durable transaction.

        The caller acknowledges every message once this returns, stored or not: a
        redelivery already stored is skipped, and a full intake drops by its policy.
        """
        added = Added()
        received = time.time() if now is None else now
        group: deque[_Pending] = deque()
        with self.database.transaction() as db:
            for message, lane in items:
                key = message_key(message)
                if (
                    message.dup
                    and db.execute("SELECT 1 FROM seen WHERE key = ?", (key,)).fetchone()
                ):
                    added.skipped += 1
                    continue
                size = len(message.payload)
                if not self._make_room(size, group, received, added):
                    self._explain(message, "intake_full_refused", received)
                    added.dropped += 1
                    continue
                group.append(_Pending(message, lane, key))
                self._count += 1
                self._bytes += size
            added.stored = len(group)
            insert_rows(
                db,
                "intake",
                (
                    "lane",
                    "topic",
                    "payload",
                    "correlation",
                    "content_type",
                    "properties",
                    "received",
                ),
                [
                    (
                        p.lane,
                        p.message.topic,
                        p.message.payload,
                        p.message.correlation_data,
                        p.message.content_type,
                        _properties(p.message) or None,
                        received,
                    )
                    for p in group
                ],
            )
            seen = [(p.key, self._tick + n + 1) for n, p in enumerate(group)]
            self._tick += len(seen)
            insert_rows(db, "seen", ("key", "at"), seen, replace=True)
            if seen and self._tick // 1024 != (self._tick - len(seen)) // 1024:
                db.execute(
                    "DELETE FROM seen WHERE at <= ?", (self._tick - self.settings.dedupe_window,)
                )
        if group:
            with self._ready:
                for item in group:
                    state = self._lanes.setdefault(item.lane, _LaneState())
                    if state.pending <= 0:
                        state.since = time.monotonic()
                    state.pending += 1
                self._ready.notify_all()
        return added

    def _make_room(self, size: int, group: deque[_Pending], now: float, added: Added) -> bool:
        """True when a reading of ``size`` bytes fits, after dropping the oldest if allowed."""
        while (
            self._count + 1 > self.settings.max_messages
            or self._bytes + size > self.settings.max_bytes
        ):
            if self.settings.policy == "refuse_new":
                return False
            if not self._evict_stored(now):
                if not group:
                    return False
                oldest = group.popleft()  # stored rows are all being inferred: the group's go
                self._count -= 1
                self._bytes -= len(oldest.message.payload)
                self._explain(oldest.message, "intake_full_oldest", now)
            added.dropped += 1
        return True

    def _evict_stored(self, now: float) -> bool:
        """Drop the oldest stored reading no worker has taken; False when there is none."""
        while True:
            with self._ready:
                cursors = {lane: state.cursor for lane, state in self._lanes.items()}
            oldest = None
            for lane, cursor in cursors.items():
                row = self._db.execute(
                    f"SELECT {_COLUMNS} FROM intake WHERE lane = ? AND id > ? ORDER BY id LIMIT 1",
                    (lane, cursor),
                ).fetchone()
                if row is not None and (oldest is None or row[0] < oldest[0]):
                    oldest = row
            if oldest is None:
                return False
            reading = _stored(oldest)
            with self._ready:
                state = self._lanes[reading.lane]
                if reading.id <= state.cursor:
                    continue  # taken meanwhile: look again
                state.evicted.add(reading.id)
                state.pending -= 1
            self._db.execute("DELETE FROM intake WHERE id = ?", (reading.id,))
            self._count -= 1
            self._bytes -= len(reading.message.payload)
            self._explain(reading.message, "intake_full_oldest", now)
            return True

    def _explain(self, message: Message, reason: str, now: float) -> None:
        self.database.explain("reading", reading_id_of(message), message.topic, reason, now)

    # ------------------------------------------------------------------ taking

    def next_batch(
        self,
        lane: str,
        *,
        max_messages: int,
        max_delay_s: float,
        stop: threading.Event,
        idle_s: float = 0.2,
    ) -> list[StoredReading]:
        """The lane's next readings in arrival order (empty when none came within ``idle_s``).

        A batch closes at ``max_messages`` readings or ``max_delay_s`` after its first one
        was stored.
        """
        deadline = time.monotonic() + idle_s
        with self._ready:
            state = self._lanes.setdefault(lane, _LaneState())
        if not state.take.acquire(timeout=idle_s):
            return []
        try:
            with self._ready:
                while True:
                    if stop.is_set():
                        return []
                    now = time.monotonic()
                    if state.pending >= max_messages or (
                        state.pending > 0 and now >= state.since + max_delay_s
                    ):
                        break
                    if now >= deadline:
                        return []
                    wake = deadline
                    if state.pending > 0:
                        wake = min(deadline, state.since + max_delay_s)
                    self._ready.wait(max(0.0005, wake - now))
                cursor = state.cursor
            rows = self.database.read(
                f"SELECT {_COLUMNS} FROM intake WHERE lane = ? AND id > ? ORDER BY id LIMIT ?",
                lane,
                cursor,
                max_messages,
            )
            with self._ready:
                batch = [_stored(row) for row in rows if row[0] not in state.evicted]
                if rows:
                    state.cursor = int(rows[-1][0])
                    state.evicted = {i for i in state.evicted if i > state.cursor}
                state.taken.update(r.id for r in batch)
                state.pending -= len(batch)
                # what is left waited at least as long as this batch: due at once
                state.since = time.monotonic() - max_delay_s
            return batch
        finally:
            state.take.release()

    def remove(self, readings: Sequence[StoredReading]) -> None:
        """Forget readings whose answers are stored (inside the caller's transaction)."""
        if not readings:
            return
        with self.database.transaction() as db:
            delete_ids(db, "intake", "id", [r.id for r in readings])
            self._count -= len(readings)
            self._bytes -= sum(len(r.message.payload) for r in readings)
        with self._ready:
            for reading in readings:
                state = self._lanes.get(reading.lane)
                if state is not None:
                    state.taken.discard(reading.id)

    def relane(self, lanes: set[str], lane_of: Callable[[str], str | None]) -> int:
        """Give stored readings of lanes not in ``lanes`` the lane of their topic now.

        For a start with other bindings than the last; readings no binding matches any
        more are dropped, counted and explained (``unbound``). Call before taking.
        Returns how many were dropped.
        """
        dropped = 0
        with self.database.transaction() as db:
            marks = ", ".join("?" for _ in lanes)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM intake WHERE lane NOT IN ({marks}) ORDER BY id",
                tuple(lanes),
            ).fetchall()
            for row in rows:
                reading = _stored(row)
                lane = lane_of(reading.message.topic)
                if lane is None:
                    db.execute("DELETE FROM intake WHERE id = ?", (reading.id,))
                    self._explain(reading.message, "unbound", time.time())
                    dropped += 1
                else:
                    db.execute("UPDATE intake SET lane = ? WHERE id = ?", (lane, reading.id))
            with self._ready:
                self._lanes = {}
            self._recount()
        return dropped

    # ------------------------------------------------------------------ figures

    def depth(self, lane: str | None = None) -> int:
        """Readings stored and not yet answered (all, or of one lane)."""
        if lane is None:
            return self._count
        with self._ready:
            state = self._lanes.get(lane)
            return max(0, state.pending) + len(state.taken) if state is not None else 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest_age_s(self) -> float:
        rows = self.database.read("SELECT received FROM intake ORDER BY id LIMIT 1")
        return max(0.0, time.time() - float(rows[0][0])) if rows else 0.0


def _properties(message: Message) -> bytes:
    if not message.user_properties:
        return b""
    try:
        return orjson.dumps(message.user_properties, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return b""


def _stored(row: tuple[Any, ...]) -> StoredReading:
    ident, lane, topic, payload, correlation, content_type, properties, received = row
    props: dict[str, str] = {}
    if properties:
        try:
            loaded = orjson.loads(properties)
            props = {str(k): str(v) for k, v in loaded.items()}
        except (orjson.JSONDecodeError, AttributeError):
            props = {}
    message = Message(
        topic=str(topic),
        payload=bytes(payload),
        qos=1,
        correlation_data=bytes(correlation) if correlation is not None else None,
        user_properties=props,
        content_type=str(content_type) if content_type is not None else None,
    )
    return StoredReading(int(ident), str(lane), message, float(received))
