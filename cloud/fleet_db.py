"""Fleet state in a database: devices, manifests, rollouts and per-device rollout progress.

The one data-access layer for fleet state, on SQLAlchemy Core. SQLite is the embedded
default (``sqlite:///path/fleet.db``, four slashes for an absolute path); PostgreSQL
(psycopg 3) is chosen by URL (``postgresql://user@host:5432/db``). The tables are declared
once (:mod:`cloud.fleet_schema`) and the same statements run on both; JSON values are
stored as text; upserts use ``INSERT .. ON CONFLICT`` (SQLite >= 3.24, PostgreSQL). Opening
a database migrates it to the code's schema (Alembic, :mod:`cloud.fleet_migrate`). Every
table name starts with ``prefix`` so tests (and several fleets in one database) do not clash.

The database is the hand-off between processes: the CLI writes rollouts and their
pause/resume/abort requests, the controller in ``tether fleet serve`` acts on them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    URL,
    ColumnElement,
    CursorResult,
    Engine,
    Executable,
    MetaData,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    exists,
    func,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool, StaticPool
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import DOUBLE_PRECISION

from cloud import fleet_migrate
from cloud.fleet_schema import VERSION_TABLE, fleet_tables
from cloud.rollout_policy import RolloutPolicy
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


#: A time column's type, for bound parameters that SQLAlchemy cannot infer.
_TIME: DOUBLE_PRECISION[float] = DOUBLE_PRECISION(asdecimal=False)


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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
        self.tables = fleet_tables(prefix)
        self._lock = threading.RLock()
        self.engine = fleet_engine(url)
        #: ``dialect.name`` is ``sqlite`` or ``postgresql``.
        self.dialect = self.engine.dialect
        self._in_tx = False
        try:
            self.create_schema()
            # Single statements autocommit (one round trip each); :meth:`transaction`
            # brackets several with BEGIN ... COMMIT on the same connection.
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        except OperationalError as exc:
            self.engine.dispose()
            raise Unavailable(
                f"cannot reach the fleet database at {redact_url(url)}: {exc.orig}"
            ) from None

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self.engine.dispose()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the enclosed calls atomically (nested calls join the outer transaction)."""
        with self._lock:
            if self._in_tx:
                yield
                return
            self._conn.exec_driver_sql("BEGIN")
            self._in_tx = True
            try:
                yield
            except BaseException:
                self._in_tx = False
                self._conn.exec_driver_sql("ROLLBACK")
                raise
            self._in_tx = False
            self._conn.exec_driver_sql("COMMIT")

    def _exec(
        self, statement: Executable, params: dict[str, Any] | None = None
    ) -> CursorResult[Any]:
        with self._lock:
            return self._conn.execute(statement, params)

    def _rows(self, statement: Executable) -> list[Any]:
        with self._lock:
            return list(self._conn.execute(statement).all())

    def _exec_many(self, statement: UpdateBase, rows: Sequence[dict[str, Any]]) -> None:
        """Run one statement for many parameter rows (the drivers' executemany: psycopg
        pipelines them).

        Compiled once per call and handed to the driver as is: SQLAlchemy's own
        executemany builds each row's parameters in Python (about 5 us a row), which
        tripled the time of recording a 10,000-device fleet's events. The columns here
        need no type conversion, so nothing is lost.
        """
        if not rows:
            return
        compiled = statement.compile(dialect=self.dialect, column_keys=list(rows[0]))
        assert isinstance(compiled, SQLCompiler)
        fixed = compiled.params  # the values written into the statement itself
        params: list[Any]
        if compiled.positiontup is not None:
            row_of = itemgetter(*compiled.positiontup)
            if len(compiled.positiontup) == 1:
                params = [(row_of({**fixed, **row}),) for row in rows]
            elif fixed.keys() <= rows[0].keys():
                params = [row_of(row) for row in rows]
            else:
                params = [row_of({**fixed, **row}) for row in rows]
        else:
            params = [{**fixed, **row} for row in rows]
        with self._lock:
            self._conn.exec_driver_sql(compiled.string, params)

    def _insert(self, table: Table) -> PgInsert | SqliteInsert:
        """``INSERT`` that can say ``ON CONFLICT`` in this database's dialect."""
        return sqlite_insert(table) if self.dialect.name == "sqlite" else pg_insert(table)

    def _fenced(self, fence: LeaseTerm) -> ColumnElement[bool]:
        """True while ``fence`` is the lease's current term."""
        leases = self.tables.leases
        return exists().where(
            leases.c.name == fence.name,
            leases.c.holder == fence.holder,
            leases.c.epoch == fence.epoch,
        )

    def create_schema(self) -> None:
        """Bring the database to the schema of this code (Alembic ``upgrade head``; safe to
        run on every start, and by several processes at once)."""
        with self._lock, self.engine.connect() as connection:
            fleet_migrate.upgrade(connection, self.prefix)

    def schema_revision(self) -> str | None:
        """The migration revision the database is at."""
        with self._lock, self.engine.connect() as connection:
            return fleet_migrate.current(connection, self.prefix)

    def drop_schema(self) -> None:
        """Drop every table of this prefix (tests clean up with it)."""
        with self._lock:
            self.tables.metadata.drop_all(self._conn)
            version = Table(f"{self.prefix}{VERSION_TABLE}", MetaData())
            version.drop(self._conn, checkfirst=True)

    # ------------------------------------------------------------------ devices

    def upsert_device(self, device: str, status: DeviceStatus, seen_at: float) -> None:
        """Record a device's status; a last will (``online`` false, nothing else) keeps the rest."""
        self.upsert_devices([(device, status, seen_at)])

    def upsert_devices(self, statuses: Sequence[tuple[str, DeviceStatus, float]]) -> None:
        """Record ``(device, status, seen_at)`` in order, a run of the same kind (will or
        full status) at a time, so a device's later report still wins."""
        devices = self.tables.devices
        will = self._insert(devices).values(
            device=bindparam("device"),
            online=0,
            agent_version="",
            hardware="",
            labels="{}",
            models="{}",
            health="{}",
            last_seen=bindparam("last_seen"),
        )
        will_sql = will.on_conflict_do_update(
            index_elements=[devices.c.device],
            set_={"online": 0, "last_seen": will.excluded.last_seen},
        )
        full = self._insert(devices)
        full_sql = full.on_conflict_do_update(
            index_elements=[devices.c.device],
            set_={
                name: full.excluded[name]
                for name in (
                    "online",
                    "agent_version",
                    "hardware",
                    "labels",
                    "models",
                    "health",
                    "last_seen",
                )
            },
        )
        run: list[dict[str, Any]] = []
        run_sql: UpdateBase = will_sql
        with self.transaction():
            for device, status, seen_at in statuses:
                will_only = not status.online and not status.models and not status.labels
                sql = will_sql if will_only else full_sql
                if sql is not run_sql:
                    self._exec_many(run_sql, run)
                    run, run_sql = [], sql
                if will_only:
                    run.append({"device": device, "last_seen": seen_at})
                    continue
                models = {name: state.model_dump() for name, state in status.models.items()}
                run.append(
                    {
                        "device": device,
                        "online": int(status.online),
                        "agent_version": status.agent_version,
                        "hardware": status.hardware,
                        "labels": json.dumps(status.labels, sort_keys=True),
                        "models": json.dumps(models, sort_keys=True),
                        "health": json.dumps(status.health, sort_keys=True, default=str),
                        "last_seen": seen_at,
                    }
                )
            self._exec_many(run_sql, run)

    def get_device(self, device: str) -> DeviceRecord | None:
        devices = self.tables.devices
        rows = self._rows(select(devices).where(devices.c.device == device))
        return _device(rows[0]) if rows else None

    def online_devices(self, devices: Sequence[str]) -> set[str]:
        """Which of ``devices`` are online now (their latest status, not their will)."""
        table = self.tables.devices
        online: set[str] = set()
        with self._lock:
            for chunk in _chunks(sorted(set(devices))):
                rows = self._rows(
                    select(table.c.device).where(table.c.online == 1, table.c.device.in_(chunk))
                )
                online.update(str(row[0]) for row in rows)
        return online

    def list_devices(self, selector: dict[str, str] | None = None) -> list[DeviceRecord]:
        """Devices whose labels contain every ``key=value`` of ``selector``, by id."""
        table = self.tables.devices
        devices = [_device(row) for row in self._rows(select(table).order_by(table.c.device))]
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
                insert(self.tables.manifests).values(
                    model=m.model,
                    version=m.version,
                    sha256=m.sha256,
                    size=m.size,
                    signed=json.dumps(signed.dump()),
                    created_at=m.created_at,
                )
            )

    def get_manifest(self, model: str, version: int) -> SignedManifest | None:
        table = self.tables.manifests
        rows = self._rows(
            select(table.c.signed).where(table.c.model == model, table.c.version == version)
        )
        return SignedManifest.parse(rows[0][0]) if rows else None

    def latest_manifest(self, model: str) -> SignedManifest | None:
        table = self.tables.manifests
        rows = self._rows(
            select(table.c.signed)
            .where(table.c.model == model)
            .order_by(table.c.version.desc())
            .limit(1)
        )
        return SignedManifest.parse(rows[0][0]) if rows else None

    def list_manifests(self) -> list[SignedManifest]:
        table = self.tables.manifests
        rows = self._rows(select(table.c.signed).order_by(table.c.model, table.c.version))
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
        rollouts = self.tables.rollouts
        with self.transaction():
            rows = self._rows(select(rollouts.c.id).where(rollouts.c.rollout_key == key))
            if rows:
                return self.rollout(rows[0][0]), False
            self._exec(
                insert(rollouts).values(
                    id=rollout_id,
                    rollout_key=key,
                    model=model,
                    version=version,
                    selector=json.dumps(selector, sort_keys=True),
                    policy=policy.to_json(),
                    state="running",
                    wave=0,
                    wave_started_at=None,
                    reason="",
                    created_at=now,
                    updated_at=now,
                )
            )
            self._exec_many(
                insert(self.tables.rollout_devices).values(
                    rollout_id=rollout_id,
                    device=bindparam("device"),
                    wave=bindparam("wave"),
                    previous_version=bindparam("previous_version"),
                    step=None,
                    reason="",
                    updated_at=now,
                ),
                [
                    {"device": device, "wave": wave, "previous_version": previous}
                    for device, wave, previous in devices
                ],
            )
            return self.rollout(rollout_id), True

    def find_rollout(
        self, model: str, version: int, selector: dict[str, str]
    ) -> RolloutRecord | None:
        """The rollout of this model version to this selection, if there is one."""
        rollouts = self.tables.rollouts
        rows = self._rows(
            select(rollouts.c.id).where(
                rollouts.c.rollout_key == rollout_key(model, version, selector)
            )
        )
        return self.rollout(rows[0][0]) if rows else None

    def rollout(self, rollout_id: str) -> RolloutRecord:
        """One rollout by id (a unique prefix of the id works too)."""
        rollouts = self.tables.rollouts
        rows = self._rows(select(rollouts).where(rollouts.c.id == rollout_id))
        if not rows:
            rows = self._rows(select(rollouts).where(rollouts.c.id.like(rollout_id + "%")))
            if len(rows) != 1:
                raise NotFound(f"no rollout {rollout_id!r}")
        return _rollout(rows[0])

    def list_rollouts(self, *, active_only: bool = False) -> list[RolloutRecord]:
        rollouts = self.tables.rollouts
        query = select(rollouts)
        if active_only:
            query = query.where(rollouts.c.state.in_(ACTIVE_STATES))
        return [_rollout(row) for row in self._rows(query.order_by(rollouts.c.created_at))]

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
        rollouts = self.tables.rollouts
        values: dict[str, Any] = {"state": state, "updated_at": now}
        if reason is not None:
            values["reason"] = reason
        if wave is not None:
            values["wave"] = wave
        if wave_started_at is not None:
            values["wave_started_at"] = wave_started_at
        statement = update(rollouts).values(values).where(rollouts.c.id == rollout_id)
        if only_from is not None:
            statement = statement.where(rollouts.c.state.in_(only_from))
        if expect_wave is not None:
            statement = statement.where(rollouts.c.wave == expect_wave)
        if fence is not None:
            statement = statement.where(self._fenced(fence))
        return self._exec(statement).rowcount > 0

    def active_rollout_of(self, devices: Sequence[str]) -> dict[str, str]:
        """device -> id of the unfinished rollout it takes part in, for ``devices``."""
        wanted = set(devices)
        d, r = self.tables.rollout_devices, self.tables.rollouts
        rows = self._rows(
            select(d.c.device, r.c.id)
            .join(r, r.c.id == d.c.rollout_id)
            .where(r.c.state.in_(ACTIVE_STATES))
        )
        return {device: rid for device, rid in rows if device in wanted}

    # ------------------------------------------------------------------ rollout devices

    def rollout_devices(self, rollout_id: str, *, health: bool = True) -> list[RolloutDevice]:
        """A rollout's devices by wave and id; ``health=False`` skips reading (and parsing)
        their health reports, which the controller needs only when it judges a wave."""
        d = self.tables.rollout_devices
        rows = self._rows(
            select(
                d.c.rollout_id,
                d.c.device,
                d.c.wave,
                d.c.previous_version,
                d.c.step,
                d.c.reason,
                d.c.health if health else null(),
                d.c.ordered_at,
                d.c.active_at,
                d.c.rollback_at,
                d.c.updated_at,
            )
            .where(d.c.rollout_id == rollout_id)
            .order_by(d.c.wave, d.c.device)
        )
        return [_rollout_device(row) for row in rows]

    def committed_health(self, rollout_id: str, max_wave: int) -> list[HealthReport]:
        """Health reports of the ordered devices of waves up to ``max_wave`` that committed."""
        d = self.tables.rollout_devices
        rows = self._rows(
            select(d.c.health)
            .where(
                d.c.rollout_id == rollout_id,
                d.c.wave <= max_wave,
                d.c.ordered_at.is_not(None),
                d.c.step == "committed",
                d.c.health.is_not(None),
            )
            .order_by(d.c.wave, d.c.device)
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
        d = self.tables.rollout_devices
        values: dict[str, Any] = {"updated_at": now}
        if step is not None:
            values.update(step=step, reason=reason)
        if column:
            values[column] = now
        statement = update(d).values(values).where(d.c.rollout_id == rollout_id)
        if unless_steps:
            statement = statement.where(or_(d.c.step.is_(None), d.c.step.not_in(unless_steps)))
        changed = 0
        with self.transaction():
            for chunk in _chunks(list(dict.fromkeys(devices))):
                changed += self._exec(statement.where(d.c.device.in_(chunk))).rowcount
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
        d = self.tables.rollout_devices
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
                        select(d.c.device).where(
                            d.c.rollout_id == rollout_id, d.c.device.in_(chunk)
                        )
                    )
                    known.update((rollout_id, str(row[0])) for row in rows)
            updates: list[dict[str, Any]] = []
            history: list[dict[str, Any]] = []
            for device, event, received_at in events:
                if (event.rollout_id, device) not in known:
                    ignored += 1
                    continue
                health = event.health.model_dump_json(exclude_none=True) if event.health else None
                updates.append(
                    {
                        "b_step": event.step,
                        "b_reason": event.reason,
                        "b_health": health,
                        "b_active": received_at if event.step == "active" else None,
                        "b_now": received_at,
                        "b_rollout": event.rollout_id,
                        "b_device": device,
                    }
                )
                history.append(
                    {
                        "rollout_id": event.rollout_id,
                        "device": device,
                        "version": event.version,
                        "step": event.step,
                        "reason": event.reason,
                        "health": health,
                        "at": event.at,
                    }
                )
            # In arrival order: of several events of one device, the last one's step wins.
            self._exec_many(
                update(d)
                .where(
                    d.c.rollout_id == bindparam("b_rollout"), d.c.device == bindparam("b_device")
                )
                .values(
                    step=bindparam("b_step"),
                    reason=bindparam("b_reason"),
                    health=func.coalesce(bindparam("b_health", type_=Text), d.c.health),
                    active_at=func.coalesce(d.c.active_at, bindparam("b_active", type_=_TIME)),
                    updated_at=bindparam("b_now"),
                ),
                updates,
            )
            self._exec_many(insert(self.tables.rollout_events), history)
        return ignored

    # ------------------------------------------------------------------ intake drops

    def add_drops(self, counts: dict[str, int]) -> None:
        """Add to the counts of device reports the controller dropped, by reason."""
        drops = self.tables.intake_drops
        with self.transaction():
            for reason, count in sorted(counts.items()):
                if count:
                    statement = self._insert(drops).values(reason=reason, count=count)
                    self._exec(
                        statement.on_conflict_do_update(
                            index_elements=[drops.c.reason],
                            set_={"count": drops.c["count"] + statement.excluded["count"]},
                        )
                    )

    def intake_drops(self) -> dict[str, int]:
        """Device reports dropped so far, by reason (every controller of the database)."""
        drops = self.tables.intake_drops
        rows = self._rows(select(drops.c.reason, drops.c["count"]))
        return {str(reason): int(count) for reason, count in rows}

    def device_history(self, rollout_id: str, device: str) -> list[tuple[str, str, float]]:
        """``(step, reason, at)`` of every event a device sent for a rollout, oldest first."""
        e = self.tables.rollout_events
        rows = self._rows(
            select(e.c.step, e.c.reason, e.c.at)
            .where(e.c.rollout_id == rollout_id, e.c.device == device)
            .order_by(e.c.id)
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
        rollouts = self.tables.rollouts
        with self.transaction():
            statement = (
                update(rollouts)
                .values(wave=wave, wave_started_at=now, updated_at=now)
                .where(
                    rollouts.c.id == rollout_id,
                    rollouts.c.state == "running",
                    rollouts.c.wave == expect_wave,
                )
            )
            if first:
                statement = statement.where(rollouts.c.wave_started_at.is_(None))
            if fence is not None:
                statement = statement.where(self._fenced(fence))
            if self._exec(statement).rowcount == 0:
                return False
            log = self.tables.wave_log
            self._exec(
                self._insert(log)
                .values(rollout_id=rollout_id, wave=wave, holder=holder, epoch=epoch, at=now)
                .on_conflict_do_nothing(index_elements=[log.c.rollout_id, log.c.wave])
            )
            return True

    def wave_log(self, rollout_id: str) -> list[tuple[int, str, int, float]]:
        """``(wave, holder, epoch, at)`` of every wave opening of a rollout, in order."""
        log = self.tables.wave_log
        rows = self._rows(
            select(log.c.wave, log.c.holder, log.c.epoch, log.c.at)
            .where(log.c.rollout_id == rollout_id)
            .order_by(log.c.wave)
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
        leases = self.tables.leases
        with self.transaction():
            self._exec(
                self._insert(leases)
                .values(name=name, holder=holder, epoch=0, expires_at=now - 1.0, seq=0)
                .on_conflict_do_nothing(index_elements=[leases.c.name])
            )
            rows = self._rows(
                select(leases.c.holder, leases.c.epoch, leases.c.expires_at, leases.c.seq).where(
                    leases.c.name == name
                )
            )
            current, epoch, expires_at = str(rows[0][0]), int(rows[0][1]), float(rows[0][2])
            floor = max(int(rows[0][3]), seq)
            this_term = update(leases).where(leases.c.name == name, leases.c.epoch == epoch)
            if current == holder and expires_at > now:
                renewed = self._exec(this_term.values(expires_at=now + ttl_s, seq=floor)).rowcount
                return (LeaseTerm(name, holder, epoch), floor) if renewed else None
            if expires_at > now:
                return None
            taken = self._exec(
                this_term.values(holder=holder, epoch=epoch + 1, expires_at=now + ttl_s, seq=floor)
            ).rowcount
            return (LeaseTerm(name, holder, epoch + 1), floor) if taken else None

    def lease(self, name: str) -> tuple[str, int, float] | None:
        """``(holder, epoch, expires_at)`` of lease ``name`` as recorded (maybe expired)."""
        leases = self.tables.leases
        rows = self._rows(
            select(leases.c.holder, leases.c.epoch, leases.c.expires_at).where(
                leases.c.name == name
            )
        )
        return (str(rows[0][0]), int(rows[0][1]), float(rows[0][2])) if rows else None

    def release_lease(self, term: LeaseTerm) -> None:
        """Give the lease up now (a clean stop), so another holder need not wait it out."""
        leases = self.tables.leases
        self._exec(
            update(leases)
            .values(expires_at=0)
            .where(
                leases.c.name == term.name,
                leases.c.holder == term.holder,
                leases.c.epoch == term.epoch,
            )
        )


def fleet_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql://...`` (psycopg 3), without a pool:
    a :class:`FleetDB` holds one connection for its lifetime and opens another only to
    migrate."""
    if url.startswith("sqlite://"):
        target = sqlite_path(url)
        if target == ":memory:":
            # One in-memory database: every connection must be the same one.
            engine = create_engine(
                "sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False}
            )
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(
                URL.create("sqlite", database=target),
                poolclass=NullPool,
                connect_args={"check_same_thread": False, "timeout": 30},
            )
        event.listen(engine, "connect", _sqlite_settings)
        return engine
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return create_engine(
                "postgresql+psycopg://" + url.removeprefix(scheme),
                poolclass=NullPool,
                connect_args={"connect_timeout": 10},
            )
    raise InvalidInput(
        f"database URL must be sqlite:///path or postgresql://..., got {redact_url(url)}"
    )


def _sqlite_settings(connection: Any, _record: Any) -> None:
    """Write-ahead log (readers never wait for the writer) and a 30 s busy timeout."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def schema_revision(url: str, *, prefix: str = "fleet_") -> str | None:
    """The migration revision of the fleet database at ``url``, without migrating it
    (``None``: not migrated yet, or empty)."""
    if url.startswith("sqlite://") and not _sqlite_file_exists(sqlite_path(url)):
        return None  # and do not create it
    engine = fleet_engine(url)
    try:
        with engine.connect() as connection:
            return fleet_migrate.current(connection, prefix)
    except OperationalError as exc:
        raise Unavailable(
            f"cannot reach the fleet database at {redact_url(url)}: {exc.orig}"
        ) from None
    finally:
        engine.dispose()


def _sqlite_file_exists(path: str) -> bool:
    return path == ":memory:" or Path(path).exists()


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
