"""The bridge's one SQLite file: the intake, the outbox, and the explanations of every drop.

One file, one connection, one lock: a batch's results go into the outbox in the same
transaction that takes its readings out of the intake, so a crash leaves either the
readings or their answers, never both and never neither. WAL journal; ``synchronous``
FULL by default (a commit survives power loss), NORMAL survives crashes only.

Transactions nest: :meth:`SensorDatabase.transaction` inside another joins it, so the
intake's and the outbox's own methods can run alone or as parts of one commit. Reads of
committed rows (:meth:`SensorDatabase.read`) go through a second connection, so they do
not wait while a commit is being flushed to disk (WAL lets readers run beside the
writer). Writes use few statements (:func:`insert_rows`): the ``sqlite3`` module lets go
of the GIL around every statement, and getting it back is what a busy process waits on.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

DropListener = Callable[[str, str, int], None]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS drops (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, reading_id TEXT NOT NULL,
    topic TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

#: Explanations of the drops table kept (older ones go; the counters keep the totals).
DROPS_KEPT = 100_000
#: Bound parameters in one statement (SQLite allows 32766 since 3.32, 999 before).
MAX_PARAMETERS = 30_000 if sqlite3.sqlite_version_info >= (3, 32) else 999


def insert_rows(
    db: sqlite3.Connection,
    table: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    replace: bool = False,
) -> None:
    """``INSERT`` (``OR REPLACE``) many rows with one multi-row statement per chunk."""
    width = len(columns)
    per_statement = max(1, MAX_PARAMETERS // width)
    row_marks = "(" + ", ".join("?" for _ in columns) + ")"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        db.execute(
            f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} ({', '.join(columns)}) VALUES "
            + ", ".join(row_marks for _ in chunk),
            [value for row in chunk for value in row],
        )


def delete_ids(db: sqlite3.Connection, table: str, column: str, ids: Sequence[int]) -> None:
    """``DELETE`` the rows whose ``column`` is in ``ids``, one statement per chunk."""
    for start in range(0, len(ids), MAX_PARAMETERS):
        chunk = ids[start : start + MAX_PARAMETERS]
        db.execute(
            f"DELETE FROM {table} WHERE {column} IN ({', '.join('?' for _ in chunk)})", chunk
        )


class SensorDatabase:
    """The SQLite file of the bridge, its lock, transactions and the record of drops."""

    def __init__(
        self,
        path: Path,
        synchronous: Literal["full", "normal"] = "full",
        on_drop: DropListener | None = None,
    ) -> None:
        self.path = path
        self.on_drop = on_drop
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self.db.executescript(_SCHEMA)
        self.lock = threading.RLock()
        self._reader = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._depth = 0
        self._rollback_listeners: list[Callable[[], None]] = []

    def close(self) -> None:
        with self.lock, self._read_lock:
            self._reader.close()
            self.db.close()

    def read(self, sql: str, *args: Any) -> list[Any]:
        """Rows of a query over committed data (does not wait for a commit in progress)."""
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def scalar(self, sql: str, *args: Any) -> int:
        with self.lock:
            row = self.db.execute(sql, args).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def on_rollback(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after a rollback (to recount what the transaction had changed)."""
        self._rollback_listeners.append(listener)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error); nested calls join it."""
        with self.lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.db
                finally:
                    self._depth -= 1
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self.db
            except BaseException:
                self._depth = 0
                self.db.execute("ROLLBACK")
                for listener in self._rollback_listeners:
                    listener()
                raise
            self._depth = 0
            self.db.execute("COMMIT")

    # ------------------------------------------------------------------ drops

    def explain(
        self, kind: str, reading_id: str, topic: str, reason: str, now: float | None = None
    ) -> None:
        """Count and explain one dropped record (inside the caller's transaction)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO drops (kind, reading_id, topic, reason, at) VALUES (?, ?, ?, ?, ?)",
                (kind, reading_id, topic, reason, time.time() if now is None else now),
            )
            db.execute(
                "INSERT INTO counters (name, value) VALUES (?, 1) "
                "ON CONFLICT(name) DO UPDATE SET value = value + 1",
                (f"dropped:{reason}",),
            )
            db.execute(
                "DELETE FROM drops WHERE id <= (SELECT MAX(id) FROM drops) - ?", (DROPS_KEPT,)
            )
        if self.on_drop is not None:
            self.on_drop(kind, reason, 1)

    def dropped(self) -> dict[str, int]:
        """How many records were dropped, by reason (since the file was made)."""
        rows = self.read("SELECT name, value FROM counters WHERE name LIKE 'dropped:%'")
        return {name.split(":", 1)[1]: int(value) for name, value in rows}

    def drops(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest explained drops, newest last."""
        rows = self.read(
            "SELECT kind, reading_id, topic, reason, at FROM drops ORDER BY id DESC LIMIT ?", limit
        )
        keys = ("kind", "reading_id", "topic", "reason", "at")
        return [dict(zip(keys, row, strict=True)) for row in reversed(rows)]
