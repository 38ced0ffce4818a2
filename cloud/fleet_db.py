"""Fleet state in a database: devices, manifests, rollouts and per-device rollout progress.

The one data-access layer for fleet state. SQLite (standard library) is the embedded
default (``sqlite:///path/fleet.db``); PostgreSQL (psycopg 3) is chosen by URL
(``postgresql://user@host:5432/db``). Both run the same SQL: queries are written with
``?`` placeholders and the :class:`Dialect` rewrites them to ``%s`` for psycopg; JSON
values are stored as text; upserts use ``INSERT .. ON CONFLICT`` (SQLite >= 3.24, PostgreSQL).
The schema is created idempotently. Every table name starts with ``prefix`` so tests (and
several fleets in one database) do not clash.

The database is the hand-off between processes: the CLI writes rollouts and their
pause/resume/abort requests, the controller in ``tether fleet serve`` acts on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.errors import InvalidInput, NotFound, Unavailable
from shared.fleet import DeviceStatus, HealthReport, RolloutEvent
from shared.manifest import SignedManifest
from shared.redaction import redact_url

#: Rollout states. ``aborting`` is a request (from the CLI) the controller turns into
#: ``rolling_back``; ``completed`` and ``rolled_back`` are final.
ROLLOUT_STATES = ("running", "paused", "aborting", "rolling_back", "completed", "rolled_back")
ACTIVE_STATES = ("running", "paused", "aborting", "rolling_back")
#: Per-device steps the controller sets itself, besides the device's own RolloutEvent steps.
ORDERED, TIMEOUT = "ordered", "timeout"
#: A device of the rollout that stayed offline until the rollout's deadline (``--until``).
MISSED = "missed"
#: The selector key that matches a device's reported hardware (``--hardware``), not a label.
HARDWARE_KEY = "@hardware"

_PREFIX = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
#: Devices named in one ``IN (...)`` list (SQLite allows 32,766 parameters; stay far below).
CHUNK = 500


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Cursor(Protocol):
    rowcount: int

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchone(self) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    """What differs between SQLite and PostgreSQL, and nothing else."""

    name: str
    placeholder: str
    serial_pk: str

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT")
POSTGRES = Dialect("postgresql", "%s", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")


@dataclass
class DeviceRecord:
    """A device as last reported (its retained status, or its last will)."""

    device: str
    online: bool
    agent_version: str
    hardware: str
    labels: dict[str, str]
    models: dict[str, dict[str, Any]]
    health: dict[str, Any]
    last_seen: float

    def active_version(self, model: str) -> int | None:
        value = self.models.get(model, {}).get("active")
        return int(value) if value is not None else None

    def matches(self, selector: dict[str, str]) -> bool:
        """Every ``label=value`` of ``selector`` holds, and its :data:`HARDWARE_KEY`, if any,
        is the hardware the device reports."""
        return all(
            (self.hardware if k == HARDWARE_KEY else self.labels.get(k)) == v
            for k, v in selector.items()
        )


@dataclass
class RolloutPolicy:
    """A rollout's waves and health gate (see docs/rollouts.md)."""

    waves: list[str]
    window_s: float = 60.0
    max_failure: str = "5%"
    max_error_rate: float | None = 0.02
    max_p99_ratio: float | None = 1.5
    max_agreement_drop: float | None = 0.05
    device_timeout_s: float = 120.0
    shadow_sample_rate: float = 0.1
    #: The target set stays open this long after the start: a device offline until then
    #: gets its wave's order when it comes online (then it is marked ``missed``).
    until_s: float = 86400.0
    #: ``max_failure`` stops the rollout only once this many devices finished installing
    #: (committed or failed), so one early failure among few is not a verdict.
    min_executed: int = 0
    #: At most this many devices ordered per minute, paced evenly (``None``: no limit),
    #: multiplied by ``rate_growth`` after every ``growth_every`` committed devices.
    rate_per_minute: float | None = None
    rate_growth: float = 1.0
    growth_every: int = 0
    #: The health gate judges a wave only on evidence: at least this many requests over
    #: its committed devices' reports, and (when shadow agreement is checked and sampled)
    #: this many shadow samples; fewer fail the wave, never pass it.
    min_requests: int = 1
    min_shadow_samples: int = 1
    #: ... and this many shadow samples of the previous version behind the baseline
    #: agreement (``baseline_shadow_samples``; a report without it counts none).
    min_baseline_samples: int = 1

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutPolicy:
        return cls(**json.loads(text))


@dataclass
class RolloutRecord:
    """One rollout: what, to whom, how, and where it stands."""

    id: str
    model: str
    version: int
    selector: dict[str, str]
    policy: RolloutPolicy
    state: str
    wave: int
    wave_started_at: float | None
    reason: str
    created_at: float
    updated_at: float


@dataclass
class RolloutDevice:
    """One device's progress in one rollout."""

    rollout_id: str
    device: str
    wave: int
    previous_version: int | None
    step: str | None
    reason: str = ""
    health: HealthReport | None = None
    ordered_at: float | None = None
    active_at: float | None = None
    rollback_at: float | None = None
    updated_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseTerm:
    """One term of a lease: who holds it, and the epoch that fences a deposed holder out."""

    name: str
    holder: str
    epoch: int


def rollout_key(model: str, version: int, selector: dict[str, str]) -> str:
    """Identity of a rollout for idempotent re-application: model, version and selection."""
    text = json.dumps([model, version, sorted(selector.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FleetDB:
    """Thread-safe access to fleet state (one connection, serialised by a lock)."""

    def __init__(self, url: str, *, prefix: str = "fleet_") -> None:
        if not _PREFIX.match(prefix):
            raise InvalidInput(f"table prefix {prefix!r} must be lower-case letters, digits, _")
        self.url = url
        self.prefix = prefix
        self._lock = threading.RLock()
        self._conn: Any
        if url.startswith("sqlite://"):
            self.dialect = SQLITE
            target = sqlite_path(url)
            if target != ":memory:":
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                target, check_same_thread=False, isolation_level=None, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=30000")
        elif url.startswith(("postgresql://", "postgres://")):
            import psycopg

            self.dialect = POSTGRES
            try:
                self._conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise Unavailable(f"cannot reach PostgreSQL at {redact_url(url)}: {exc}") from None
        else:
            raise InvalidInput(
                f"database URL must be sqlite:///path or postgresql://..., got {redact_url(url)}"
            )
        self._in_tx = False
        self.create_schema()

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed calls atomically (nested calls join the outer transaction)."""
        with self._lock:
            if self._in_tx:
                yield
                return
            self._conn.execute("BEGIN")
            self._in_tx = True
            try:
                yield
            except BaseException:
                self._in_tx = False
                self._conn.execute("ROLLBACK")
                raise
            self._in_tx = False
            self._conn.execute("COMMIT")

    def _t(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        with self._lock:
            cursor: Cursor = self._conn.cursor()
            cursor.execute(self.dialect.sql(sql), tuple(params))
            return cursor

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._exec(sql, params).fetchall()

    def _exec_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for many parameter rows (psycopg pipelines them)."""
        if not rows:
            return
        with self._lock:
            self._conn.cursor().executemany(self.dialect.sql(sql), [tuple(r) for r in rows])

    def create_schema(self) -> None:
        """Create the tables if they do not exist (safe to run on every start)."""
        t = self._t
        statements = [
            f"""CREATE TABLE IF NOT EXISTS {t("devices")} (
                device TEXT PRIMARY KEY, online INTEGER NOT NULL, agent_version TEXT NOT NULL,
                hardware TEXT NOT NULL, labels TEXT NOT NULL, models TEXT NOT NULL,
                health TEXT NOT NULL, last_seen DOUBLE PRECISION NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {t("manifests")} (
                model TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
                size BIGINT NOT NULL, signed TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (model, version))""",
            f"""CREATE TABLE IF NOT EXISTS {t("rollouts")} (
                id TEXT PRIMARY KEY, rollout_key TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
                version INTEGER NOT NULL, selector TEXT NOT NULL, policy TEXT NOT NULL,
                state TEXT NOT NULL, wave INTEGER NOT NULL, wave_started_at DOUBLE PRECISION,
                reason TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {t("rollout_devices")} (
                rollout_id TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL,
                previous_version INTEGER, step TEXT, reason TEXT NOT NULL, health TEXT,
                ordered_at DOUBLE PRECISION, active_at DOUBLE PRECISION,
                rollback_at DOUBLE PRECISION, updated_at DOUBLE PRECISION,
                PRIMARY KEY (rollout_id, device))""",
            f"""CREATE TABLE IF NOT EXISTS {t("rollout_events")} (
                id {self.dialect.serial_pk}, rollout_id TEXT NOT NULL, device TEXT NOT NULL,
                version INTEGER NOT NULL, step TEXT NOT NULL, reason TEXT NOT NULL,
                health TEXT, at DOUBLE PRECISION NOT NULL)""",
            f"""CREATE INDEX IF NOT EXISTS {t("rollout_events_by_device")}
                ON {t("rollout_events")} (rollout_id, device)""",
            f"""CREATE TABLE IF NOT EXISTS {t("wave_log")} (
                rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, holder TEXT NOT NULL,
                epoch BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (rollout_id, wave))""",
            f"""CREATE TABLE IF NOT EXISTS {t("leases")} (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL, seq BIGINT NOT NULL)""",
            f"""CREATE TABLE IF NOT EXISTS {t("intake_drops")} (
                reason TEXT PRIMARY KEY, count BIGINT NOT NULL)""",
        ]
        with self._lock:
            for statement in statements:
                self._exec(statement)

    def drop_schema(self) -> None:
        """Drop every table of this prefix (tests clean up with it)."""
        with self._lock:
            for name in (
                "intake_drops",
                "wave_log",
                "leases",
                "rollout_events",
                "rollout_devices",
                "rollouts",
                "manifests",
                "devices",
            ):
                self._exec(f"DROP TABLE IF EXISTS {self._t(name)}")

    # ------------------------------------------------------------------ devices

    def upsert_device(self, device: str, status: DeviceStatus, seen_at: float) -> None:
        """Record a device's status; a last will (``online`` false, nothing else) keeps the rest."""
        self.upsert_devices([(device, status, seen_at)])

    def upsert_devices(self, statuses: Sequence[tuple[str, DeviceStatus, float]]) -> None:
        """Record ``(device, status, seen_at)`` in order, a run of the same kind (will or
        full status) at a time, so a device's later report still wins."""
        will_sql = f"""INSERT INTO {self._t("devices")} VALUES (?, 0, '', '', '{{}}', '{{}}', '{{}}', ?)
            ON CONFLICT (device) DO UPDATE SET online = 0, last_seen = excluded.last_seen"""
        full_sql = f"""INSERT INTO {self._t("devices")} VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT (device) DO UPDATE SET online = excluded.online,
              agent_version = excluded.agent_version, hardware = excluded.hardware,
              labels = excluded.labels, models = excluded.models, health = excluded.health,
              last_seen = excluded.last_seen"""
        run: list[tuple[Any, ...]] = []
        run_sql = ""
        with self.transaction():
            for device, status, seen_at in statuses:
                will_only = not status.online and not status.models and not status.labels
                sql = will_sql if will_only else full_sql
                if sql != run_sql:
                    self._exec_many(run_sql, run)
                    run, run_sql = [], sql
                if will_only:
                    run.append((device, seen_at))
                    continue
                models = {name: state.model_dump() for name, state in status.models.items()}
                run.append(
                    (
                        device,
                        int(status.online),
                        status.agent_version,
                        status.hardware,
                        json.dumps(status.labels, sort_keys=True),
                        json.dumps(models, sort_keys=True),
                        json.dumps(status.health, sort_keys=True, default=str),
                        seen_at,
                    )
                )
            self._exec_many(run_sql, run)

    def get_device(self, device: str) -> DeviceRecord | None:
        rows = self._rows(f"SELECT * FROM {self._t('devices')} WHERE device = ?", (device,))
        return _device(rows[0]) if rows else None

    def online_devices(self, devices: Sequence[str]) -> set[str]:
        """Which of ``devices`` are online now (their latest status, not their will)."""
        online: set[str] = set()
        with self._lock:
            for chunk in _chunks(sorted(set(devices))):
                rows = self._rows(
                    f"SELECT device FROM {self._t('devices')} WHERE online = 1 "
                    f"AND device IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                online.update(str(row[0]) for row in rows)
        return online

    def list_devices(self, selector: dict[str, str] | None = None) -> list[DeviceRecord]:
        """Devices whose labels contain every ``key=value`` of ``selector``, by id."""
        rows = self._rows(f"SELECT * FROM {self._t('devices')} ORDER BY device")
        devices = [_device(row) for row in rows]
        return [d for d in devices if d.matches(selector or {})]

    # ------------------------------------------------------------------ manifests

    def put_manifest(self, signed: SignedManifest) -> None:
        """Store a signed manifest; the same (model, version) with other content is refused."""
        m = signed.manifest
        with self.transaction():
            existing = self.get_manifest(m.model, m.version)
            if existing is not None:
                if existing.manifest.sha256 != m.sha256:
                    raise InvalidInput(
                        f"{m.model} version {m.version} is already published with another "
                        f"artifact ({existing.manifest.sha256[:12]}); publish a new version"
                    )
                return
            self._exec(
                f"INSERT INTO {self._t('manifests')} VALUES (?, ?, ?, ?, ?, ?)",
                (m.model, m.version, m.sha256, m.size, json.dumps(signed.dump()), m.created_at),
            )

    def get_manifest(self, model: str, version: int) -> SignedManifest | None:
        rows = self._rows(
            f"SELECT signed FROM {self._t('manifests')} WHERE model = ? AND version = ?",
            (model, version),
        )
        return SignedManifest.parse(rows[0][0]) if rows else None

    def latest_manifest(self, model: str) -> SignedManifest | None:
        rows = self._rows(
            f"SELECT signed FROM {self._t('manifests')} WHERE model = ? "
            "ORDER BY version DESC LIMIT 1",
            (model,),
        )
        return SignedManifest.parse(rows[0][0]) if rows else None

    def list_manifests(self) -> list[SignedManifest]:
        rows = self._rows(f"SELECT signed FROM {self._t('manifests')} ORDER BY model, version")
        return [SignedManifest.parse(row[0]) for row in rows]

    # ------------------------------------------------------------------ rollouts

    def create_rollout(
        self,
        rollout_id: str,
        model: str,
        version: int,
        selector: dict[str, str],
        policy: RolloutPolicy,
        devices: list[tuple[str, int, int | None]],
        now: float,
    ) -> tuple[RolloutRecord, bool]:
        """Create a rollout with its devices ``(device, wave, previous_version)``.

        Returns ``(rollout, created)``; the same model, version and selector again returns
        the existing rollout with ``created`` false (idempotent re-application).
        """
        key = rollout_key(model, version, selector)
        with self.transaction():
            rows = self._rows(f"SELECT id FROM {self._t('rollouts')} WHERE rollout_key = ?", (key,))
            if rows:
                return self.rollout(rows[0][0]), False
            self._exec(
                f"INSERT INTO {self._t('rollouts')} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rollout_id,
                    key,
                    model,
                    version,
                    json.dumps(selector, sort_keys=True),
                    policy.to_json(),
                    "running",
                    0,
                    None,
                    "",
                    now,
                    now,
                ),
            )
            self._exec_many(
                f"""INSERT INTO {self._t("rollout_devices")}
                (rollout_id, device, wave, previous_version, step, reason, updated_at)
                VALUES (?, ?, ?, ?, NULL, '', ?)""",
                [(rollout_id, device, wave, previous, now) for device, wave, previous in devices],
            )
            return self.rollout(rollout_id), True

    def find_rollout(
        self, model: str, version: int, selector: dict[str, str]
    ) -> RolloutRecord | None:
        """The rollout of this model version to this selection, if there is one."""
        rows = self._rows(
            f"SELECT id FROM {self._t('rollouts')} WHERE rollout_key = ?",
            (rollout_key(model, version, selector),),
        )
        return self.rollout(rows[0][0]) if rows else None

    def rollout(self, rollout_id: str) -> RolloutRecord:
        """One rollout by id (a unique prefix of the id works too)."""
        rows = self._rows(f"SELECT * FROM {self._t('rollouts')} WHERE id = ?", (rollout_id,))
        if not rows:
            rows = self._rows(
                f"SELECT * FROM {self._t('rollouts')} WHERE id LIKE ?", (rollout_id + "%",)
            )
            if len(rows) != 1:
                raise NotFound(f"no rollout {rollout_id!r}")
        return _rollout(rows[0])

    def list_rollouts(self, *, active_only: bool = False) -> list[RolloutRecord]:
        sql = f"SELECT * FROM {self._t('rollouts')}"
        params: tuple[Any, ...] = ()
        if active_only:
            sql += f" WHERE state IN ({', '.join('?' * len(ACTIVE_STATES))})"
            params = ACTIVE_STATES
        return [_rollout(row) for row in self._rows(sql + " ORDER BY created_at", params)]

    def set_rollout_state(
        self,
        rollout_id: str,
        state: str,
        now: float,
        *,
        reason: str | None = None,
        only_from: Sequence[str] | None = None,
        wave: int | None = None,
        wave_started_at: float | None = None,
        expect_wave: int | None = None,
        fence: LeaseTerm | None = None,
    ) -> bool:
        """Move a rollout to ``state`` (only from ``only_from`` states, only while it is at
        ``expect_wave``, only while ``fence`` is the lease's current term); True if it moved.

        The conditions are checked by the one ``UPDATE``, so two controllers can never both
        advance the same wave, and a controller whose lease was taken over changes nothing.
        """
        if state not in ROLLOUT_STATES:
            raise InvalidInput(f"unknown rollout state {state!r}")
        sets = ["state = ?", "updated_at = ?"]
        params: list[Any] = [state, now]
        if reason is not None:
            sets.append("reason = ?")
            params.append(reason)
        if wave is not None:
            sets.append("wave = ?")
            params.append(wave)
        if wave_started_at is not None:
            sets.append("wave_started_at = ?")
            params.append(wave_started_at)
        sql = f"UPDATE {self._t('rollouts')} SET {', '.join(sets)} WHERE id = ?"
        params.append(rollout_id)
        if only_from is not None:
            sql += f" AND state IN ({', '.join('?' * len(only_from))})"
            params.extend(only_from)
        if expect_wave is not None:
            sql += " AND wave = ?"
            params.append(expect_wave)
        if fence is not None:
            sql += (
                f" AND EXISTS (SELECT 1 FROM {self._t('leases')}"
                " WHERE name = ? AND holder = ? AND epoch = ?)"
            )
            params += [fence.name, fence.holder, fence.epoch]
        return self._exec(sql, params).rowcount > 0

    def active_rollout_of(self, devices: Sequence[str]) -> dict[str, str]:
        """device -> id of the unfinished rollout it takes part in, for ``devices``."""
        wanted = set(devices)
        rows = self._rows(
            f"""SELECT d.device, r.id FROM {self._t("rollout_devices")} d
            JOIN {self._t("rollouts")} r ON r.id = d.rollout_id
            WHERE r.state IN ({", ".join("?" * len(ACTIVE_STATES))})""",
            ACTIVE_STATES,
        )
        return {device: rid for device, rid in rows if device in wanted}

    # ------------------------------------------------------------------ rollout devices

    def rollout_devices(self, rollout_id: str, *, health: bool = True) -> list[RolloutDevice]:
        """A rollout's devices by wave and id; ``health=False`` skips reading (and parsing)
        their health reports, which the controller needs only when it judges a wave."""
        column = "health" if health else "NULL"
        rows = self._rows(
            f"""SELECT rollout_id, device, wave, previous_version, step, reason, {column},
            ordered_at, active_at, rollback_at, updated_at FROM {self._t("rollout_devices")}
            WHERE rollout_id = ? ORDER BY wave, device""",
            (rollout_id,),
        )
        return [_rollout_device(row) for row in rows]

    def committed_health(self, rollout_id: str, max_wave: int) -> list[HealthReport]:
        """Health reports of the ordered devices of waves up to ``max_wave`` that committed."""
        rows = self._rows(
            f"""SELECT health FROM {self._t("rollout_devices")} WHERE rollout_id = ?
            AND wave <= ? AND ordered_at IS NOT NULL AND step = 'committed'
            AND health IS NOT NULL ORDER BY wave, device""",
            (rollout_id, max_wave),
        )
        return [HealthReport.model_validate_json(row[0]) for row in rows if row[0]]

    def mark_devices(
        self,
        rollout_id: str,
        devices: Sequence[str],
        step: str | None,
        now: float,
        *,
        reason: str = "",
        column: str | None = None,
        unless_steps: Sequence[str] = (),
    ) -> int:
        """Set the controller's own step (``ordered``, ``timeout``...) on devices.

        With ``step`` None only the timestamps change.
        ``column`` (``ordered_at`` or ``rollback_at``) is stamped with ``now``; devices whose
        step is in ``unless_steps`` are left alone (a late event won the race).
        """
        if column not in (None, "ordered_at", "rollback_at"):
            raise InvalidInput(f"bad column {column}")
        sets = "updated_at = ?" if step is None else "step = ?, reason = ?, updated_at = ?"
        stamp = f", {column} = ?" if column else ""
        guard = ""
        if unless_steps:
            guard = f" AND (step IS NULL OR step NOT IN ({', '.join('?' * len(unless_steps))}))"
        changed = 0
        with self.transaction():
            for chunk in _chunks(list(dict.fromkeys(devices))):
                params: list[Any] = [now] if step is None else [step, reason, now]
                if column:
                    params.append(now)
                params += [rollout_id, *chunk, *unless_steps]
                changed += self._exec(
                    f"""UPDATE {self._t("rollout_devices")} SET {sets}{stamp}
                    WHERE rollout_id = ? AND device IN ({", ".join("?" * len(chunk))}){guard}""",
                    params,
                ).rowcount
        return changed

    def record_events(self, events: Sequence[tuple[str, RolloutEvent, float]]) -> int:
        """Record ``(device, event, received_at)``: history, and each device's latest step;
        returns how many were ignored because the device is not in that rollout.

        The device comes from the topic. Health reports are kept (the latest wins); an
        event without one keeps the earlier report. An event for a rollout the device is
        not part of (an unknown rollout id, another device's, the agent's own ``health``
        rollbacks) changes nothing and leaves no history row, so no device can grow the
        table with made-up rollouts.
        """
        ignored = 0
        with self.transaction():
            # Which (rollout, device) pairs exist: rows are never deleted, so the answer
            # holds for the whole transaction.
            wanted: dict[str, set[str]] = {}
            for device, event, _at in events:
                wanted.setdefault(event.rollout_id, set()).add(device)
            known: set[tuple[str, str]] = set()
            for rollout_id, names in wanted.items():
                for chunk in _chunks(sorted(names)):
                    rows = self._rows(
                        f"""SELECT device FROM {self._t("rollout_devices")} WHERE rollout_id = ?
                        AND device IN ({", ".join("?" * len(chunk))})""",
                        [rollout_id, *chunk],
                    )
                    known.update((rollout_id, str(row[0])) for row in rows)
            updates: list[tuple[Any, ...]] = []
            history: list[tuple[Any, ...]] = []
            for device, event, received_at in events:
                if (event.rollout_id, device) not in known:
                    ignored += 1
                    continue
                health = event.health.model_dump_json(exclude_none=True) if event.health else None
                active = received_at if event.step == "active" else None
                updates.append(
                    (
                        event.step,
                        event.reason,
                        health,
                        active,
                        received_at,
                        event.rollout_id,
                        device,
                    )
                )
                history.append(
                    (
                        event.rollout_id,
                        device,
                        event.version,
                        event.step,
                        event.reason,
                        health,
                        event.at,
                    )
                )
            # In arrival order: of several events of one device, the last one's step wins.
            self._exec_many(
                f"""UPDATE {self._t("rollout_devices")} SET step = ?, reason = ?,
                health = COALESCE(?, health), active_at = COALESCE(active_at, ?),
                updated_at = ? WHERE rollout_id = ? AND device = ?""",
                updates,
            )
            self._exec_many(
                f"""INSERT INTO {self._t("rollout_events")}
                (rollout_id, device, version, step, reason, health, at)
                VALUES (?, ?, ?, ?, ?, ?, ?)""",
                history,
            )
        return ignored

    # ------------------------------------------------------------------ intake drops

    def add_drops(self, counts: dict[str, int]) -> None:
        """Add to the counts of device reports the controller dropped, by reason."""
        with self.transaction():
            for reason, count in sorted(counts.items()):
                if count:
                    self._exec(
                        f"""INSERT INTO {self._t("intake_drops")} VALUES (?, ?)
                        ON CONFLICT (reason) DO UPDATE
                        SET count = {self._t("intake_drops")}.count + excluded.count""",
                        (reason, count),
                    )

    def intake_drops(self) -> dict[str, int]:
        """Device reports dropped so far, by reason (every controller of the database)."""
        rows = self._rows(f"SELECT reason, count FROM {self._t('intake_drops')}")
        return {str(reason): int(count) for reason, count in rows}

    def device_history(self, rollout_id: str, device: str) -> list[tuple[str, str, float]]:
        """``(step, reason, at)`` of every event a device sent for a rollout, oldest first."""
        rows = self._rows(
            f"""SELECT step, reason, at FROM {self._t("rollout_events")}
            WHERE rollout_id = ? AND device = ? ORDER BY id""",
            (rollout_id, device),
        )
        return [(str(s), str(r), float(a)) for s, r, a in rows]

    def open_wave(
        self,
        rollout_id: str,
        wave: int,
        now: float,
        *,
        expect_wave: int,
        first: bool,
        fence: LeaseTerm | None,
        holder: str,
        epoch: int,
    ) -> bool:
        """Record that ``wave`` of a running rollout starts now, once: moves the rollout from
        ``expect_wave`` (not yet started when ``first``) under ``fence``, and writes the wave
        log, whose key refuses a second opening. True when this call opened it."""
        with self.transaction():
            sql = (
                f"UPDATE {self._t('rollouts')} SET wave = ?, wave_started_at = ?, updated_at = ? "
                "WHERE id = ? AND state = 'running' AND wave = ?"
            )
            params: list[Any] = [wave, now, now, rollout_id, expect_wave]
            if first:
                sql += " AND wave_started_at IS NULL"
            if fence is not None:
                sql += (
                    f" AND EXISTS (SELECT 1 FROM {self._t('leases')}"
                    " WHERE name = ? AND holder = ? AND epoch = ?)"
                )
                params += [fence.name, fence.holder, fence.epoch]
            if self._exec(sql, params).rowcount == 0:
                return False
            self._exec(
                f"""INSERT INTO {self._t("wave_log")} VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (rollout_id, wave) DO NOTHING""",
                (rollout_id, wave, holder, epoch, now),
            )
            return True

    def wave_log(self, rollout_id: str) -> list[tuple[int, str, int, float]]:
        """``(wave, holder, epoch, at)`` of every wave opening of a rollout, in order."""
        rows = self._rows(
            f"SELECT wave, holder, epoch, at FROM {self._t('wave_log')} WHERE rollout_id = ? "
            "ORDER BY wave",
            (rollout_id,),
        )
        return [(int(w), str(h), int(e), float(a)) for w, h, e, a in rows]

    # ------------------------------------------------------------------ leases

    def take_lease(
        self, name: str, holder: str, now: float, ttl_s: float, *, seq: int = 0
    ) -> tuple[LeaseTerm, int] | None:
        """Renew ``holder``'s unexpired lease ``name``, or take it over once expired (a new
        term, epoch + 1); the term now held and the highest ``seq`` any holder recorded
        (with this call's), or ``None`` while someone else holds it.

        Compare-and-set on the epoch, so of several controllers asking at once exactly one
        gets a new term. Expiry is judged by the callers' clocks (keep them in sync: NTP).
        The recorded ``seq`` lets a new holder number its signed orders above every order
        the previous one signed, whatever their clocks say.
        """
        leases = self._t("leases")
        with self.transaction():
            self._exec(
                f"INSERT INTO {leases} VALUES (?, ?, 0, ?, 0) ON CONFLICT (name) DO NOTHING",
                (name, holder, now - 1.0),
            )
            rows = self._rows(
                f"SELECT holder, epoch, expires_at, seq FROM {leases} WHERE name = ?", (name,)
            )
            current, epoch, expires_at = str(rows[0][0]), int(rows[0][1]), float(rows[0][2])
            floor = max(int(rows[0][3]), seq)
            if current == holder and expires_at > now:
                renewed = self._exec(
                    f"UPDATE {leases} SET expires_at = ?, seq = ? WHERE name = ? AND epoch = ?",
                    (now + ttl_s, floor, name, epoch),
                ).rowcount
                return (LeaseTerm(name, holder, epoch), floor) if renewed else None
            if expires_at > now:
                return None
            taken = self._exec(
                f"""UPDATE {leases} SET holder = ?, epoch = ?, expires_at = ?, seq = ?
                WHERE name = ? AND epoch = ?""",
                (holder, epoch + 1, now + ttl_s, floor, name, epoch),
            ).rowcount
            return (LeaseTerm(name, holder, epoch + 1), floor) if taken else None

    def lease(self, name: str) -> tuple[str, int, float] | None:
        """``(holder, epoch, expires_at)`` of lease ``name`` as recorded (maybe expired)."""
        rows = self._rows(
            f"SELECT holder, epoch, expires_at FROM {self._t('leases')} WHERE name = ?", (name,)
        )
        return (str(rows[0][0]), int(rows[0][1]), float(rows[0][2])) if rows else None

    def release_lease(self, term: LeaseTerm) -> None:
        """Give the lease up now (a clean stop), so another holder need not wait it out."""
        self._exec(
            f"UPDATE {self._t('leases')} SET expires_at = 0 WHERE name = ? AND holder = ? "
            "AND epoch = ?",
            (term.name, term.holder, term.epoch),
        )


def sqlite_path(url: str) -> str:
    """``sqlite:///rel/path.db`` -> ``rel/path.db``; four slashes for an absolute path."""
    path = url.removeprefix("sqlite://").removeprefix("/")
    return ":memory:" if path in ("", ":memory:") else path


# ---------------------------------------------------------------------------- row mapping


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        device=row[0],
        online=bool(row[1]),
        agent_version=row[2],
        hardware=row[3],
        labels=json.loads(row[4]),
        models=json.loads(row[5]),
        health=json.loads(row[6]),
        last_seen=float(row[7]),
    )


def _rollout(row: Sequence[Any]) -> RolloutRecord:
    return RolloutRecord(
        id=row[0],
        model=row[2],
        version=int(row[3]),
        selector=json.loads(row[4]),
        policy=RolloutPolicy.from_json(row[5]),
        state=row[6],
        wave=int(row[7]),
        wave_started_at=row[8],
        reason=row[9],
        created_at=float(row[10]),
        updated_at=float(row[11]),
    )


def _rollout_device(row: Sequence[Any]) -> RolloutDevice:
    return RolloutDevice(
        rollout_id=row[0],
        device=row[1],
        wave=int(row[2]),
        previous_version=row[3],
        step=row[4],
        reason=row[5],
        health=HealthReport.model_validate_json(row[6]) if row[6] else None,
        ordered_at=row[7],
        active_at=row[8],
        rollback_at=row[9],
        updated_at=row[10],
    )
