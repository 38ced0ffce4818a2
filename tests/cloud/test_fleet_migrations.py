"""Schema migrations of the fleet database, on SQLite and the real PostgreSQL alike.

A database made by the code before migrations (``CREATE TABLE IF NOT EXISTS``, kept here
verbatim so these tests keep their meaning as the code changes) is stamped and keeps its
rows; a later migration keeps them too; two controllers opening one database together
do not race.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from click.testing import CliRunner
from sqlalchemy import inspect

from cloud import fleet_migrate
from cloud.fleet_db import FleetDB, fleet_engine, schema_revision
from cloud.fleet_schema import VERSION_TABLE
from cloud.rollout_policy import RolloutPolicy
from harness.fleet import BACKENDS, POSTGRES_URL
from shared.errors import Unsupported
from shared.fleet import HealthReport, RolloutEvent

#: The schema as ``FleetDB.create_schema`` made it before Alembic (release 0.x), verbatim
#: but for ``{t}`` (the table prefix) and ``{serial_pk}`` (the dialect's identity column).
LEGACY_DDL = [
    """CREATE TABLE IF NOT EXISTS {t}devices (
                device TEXT PRIMARY KEY, online INTEGER NOT NULL, agent_version TEXT NOT NULL,
                hardware TEXT NOT NULL, labels TEXT NOT NULL, models TEXT NOT NULL,
                health TEXT NOT NULL, last_seen DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {t}manifests (
                model TEXT NOT NULL, version INTEGER NOT NULL, sha256 TEXT NOT NULL,
                size BIGINT NOT NULL, signed TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (model, version))""",
    """CREATE TABLE IF NOT EXISTS {t}rollouts (
                id TEXT PRIMARY KEY, rollout_key TEXT NOT NULL UNIQUE, model TEXT NOT NULL,
                version INTEGER NOT NULL, selector TEXT NOT NULL, policy TEXT NOT NULL,
                state TEXT NOT NULL, wave INTEGER NOT NULL, wave_started_at DOUBLE PRECISION,
                reason TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {t}rollout_devices (
                rollout_id TEXT NOT NULL, device TEXT NOT NULL, wave INTEGER NOT NULL,
                previous_version INTEGER, step TEXT, reason TEXT NOT NULL, health TEXT,
                ordered_at DOUBLE PRECISION, active_at DOUBLE PRECISION,
                rollback_at DOUBLE PRECISION, updated_at DOUBLE PRECISION,
                PRIMARY KEY (rollout_id, device))""",
    """CREATE TABLE IF NOT EXISTS {t}rollout_events (
                id {serial_pk}, rollout_id TEXT NOT NULL, device TEXT NOT NULL,
                version INTEGER NOT NULL, step TEXT NOT NULL, reason TEXT NOT NULL,
                health TEXT, at DOUBLE PRECISION NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS {t}rollout_events_by_device
                ON {t}rollout_events (rollout_id, device)""",
    """CREATE TABLE IF NOT EXISTS {t}wave_log (
                rollout_id TEXT NOT NULL, wave INTEGER NOT NULL, holder TEXT NOT NULL,
                epoch BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (rollout_id, wave))""",
    """CREATE TABLE IF NOT EXISTS {t}leases (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, epoch BIGINT NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL, seq BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS {t}intake_drops (
                reason TEXT PRIMARY KEY, count BIGINT NOT NULL)""",
]
SERIAL_PK = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}
TABLES = fleet_migrate.BASELINE_TABLES

HEALTH = HealthReport(requests=50, errors=0, shadow_samples=5, shadow_agreement=1.0)
POLICY = RolloutPolicy(waves=["1", "100%"], window_s=30.0, min_requests=10)


@dataclass
class Legacy:
    """A fleet database made by the code before migrations, reached by the raw driver."""

    backend: str
    url: str
    prefix: str

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        sql = sql.replace("{t}", self.prefix).replace("{serial_pk}", SERIAL_PK[self.backend])
        if self.backend == "sqlite":
            with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as db:
                rows = db.execute(sql, params).fetchall()
                db.commit()
                return rows
        with psycopg.connect(self.url, autocommit=True) as pg:
            cursor = pg.execute(sql.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    def version(self) -> list[tuple[Any, ...]]:
        return self.execute(f"SELECT version_num FROM {{t}}{VERSION_TABLE}")


def _url(backend: str, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/fleet.db" if backend == "sqlite" else POSTGRES_URL


@pytest.fixture(params=BACKENDS)
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Legacy]:
    """A database (SQLite file, or a fresh prefix in PostgreSQL) with no fleet tables."""
    legacy = Legacy(request.param, _url(request.param, tmp_path), f"m{uuid.uuid4().hex[:12]}_")
    yield legacy
    for name in (*TABLES, VERSION_TABLE):
        legacy.execute(f"DROP TABLE IF EXISTS {{t}}{name}")


@pytest.fixture
def legacy(empty: Legacy) -> Legacy:
    """The old schema with a fleet in it: two devices, a manifest, a rollout in its first
    wave (one device committed with health, one not yet ordered), events, a wave log,
    the controllers' lease and dropped-report counts."""
    for statement in LEGACY_DDL:
        empty.execute(statement)
    run = empty.execute
    models = '{"digits": {"active": 1, "state": "ready"}}'
    for device, site in (("d1", "a"), ("d2", "a")):
        run(
            "INSERT INTO {t}devices VALUES (?, 1, '0.9.0', 'sm_87', ?, ?, '{}', 10.0)",
            (device, f'{{"site": "{site}"}}', models),
        )
    run(
        "INSERT INTO {t}manifests VALUES ('digits', 2, ?, 10, '{}', 1.0)",
        ("ab" * 32,),
    )
    run(
        "INSERT INTO {t}rollouts VALUES ('r1', 'key1', 'digits', 2, '{\"site\": \"a\"}', ?,"
        " 'running', 0, 5.0, '', 1.0, 5.0)",
        (POLICY.to_json(),),
    )
    run(
        "INSERT INTO {t}rollout_devices VALUES ('r1', 'd1', 0, 1, 'committed', '', ?,"
        " 5.0, 6.0, NULL, 7.0)",
        (HEALTH.model_dump_json(exclude_none=True),),
    )
    run(
        "INSERT INTO {t}rollout_devices VALUES ('r1', 'd2', 1, 1, NULL, '', NULL, NULL, NULL, NULL, 1.0)"
    )
    for step, at in (("received", 5.5), ("active", 6.0), ("committed", 7.0)):
        run(
            "INSERT INTO {t}rollout_events (rollout_id, device, version, step, reason, health, at)"
            " VALUES ('r1', 'd1', 2, ?, '', NULL, ?)",
            (step, at),
        )
    run("INSERT INTO {t}wave_log VALUES ('r1', 0, 'ctl-a', 3, 5.0)")
    run("INSERT INTO {t}leases VALUES ('rollouts', 'ctl-a', 3, 0.0, 17)")
    run("INSERT INTO {t}intake_drops VALUES ('bad_signature', 4)")
    return empty


def event(device_step: str, at: float) -> RolloutEvent:
    return RolloutEvent(rollout_id="r1", model="digits", version=2, step=device_step, at=at)


def test_a_database_made_before_migrations_is_stamped_and_keeps_its_rows(legacy: Legacy) -> None:
    db = FleetDB(legacy.url, prefix=legacy.prefix)
    try:
        assert legacy.version() == [(fleet_migrate.head(),)]
        assert db.schema_revision() == fleet_migrate.head()
        # Every row is there and reads as before.
        assert [(d.device, d.labels, d.active_version("digits")) for d in db.list_devices()] == [
            ("d1", {"site": "a"}, 1),
            ("d2", {"site": "a"}, 1),
        ]
        assert db.online_devices(["d1", "d2", "d3"]) == {"d1", "d2"}
        assert [r.id for r in db.list_rollouts(active_only=True)] == ["r1"]
        rollout = db.rollout("r1")
        assert (rollout.policy, rollout.selector, rollout.wave) == (POLICY, {"site": "a"}, 0)
        assert db.find_rollout("digits", 2, {"site": "a"}) is None  # its key was made up
        assert db.committed_health("r1", 0) == [HEALTH]
        assert [s for s, _, _ in db.device_history("r1", "d1")] == [
            "received",
            "active",
            "committed",
        ]
        assert db.wave_log("r1") == [(0, "ctl-a", 3, 5.0)]
        assert db.intake_drops() == {"bad_signature": 4}
        # ... and is usable: the next controller takes the lease over (epoch and order
        # numbers continue), opens the next wave, and its device's events land after the
        # old ones.
        held = db.take_lease("rollouts", "ctl-b", 100.0, 5.0, seq=2)
        assert held is not None and held[0].epoch == 4 and held[1] == 17
        assert db.open_wave(
            "r1", 1, 100.0, expect_wave=0, first=False, fence=held[0], holder="ctl-b", epoch=4
        )
        assert db.mark_devices("r1", ["d2"], "ordered", 100.0, column="ordered_at") == 1
        assert db.record_events([("d2", event("active", 101.0), 101.0)]) == 0
        assert db.record_events([("d1", event("committed", 102.0), 102.0)]) == 0
        assert [s for s, _, _ in db.device_history("r1", "d1")][-1] == "committed"
        assert len(db.device_history("r1", "d1")) == 4
        assert db.set_rollout_state("r1", "completed", 103.0, expect_wave=1, fence=held[0])
        assert db.rollout("r1").state == "completed"
        db.add_drops({"bad_signature": 1})
        assert db.intake_drops() == {"bad_signature": 5}
    finally:
        db.close()
    # Opening it again changes nothing.
    FleetDB(legacy.url, prefix=legacy.prefix).close()
    assert legacy.version() == [(fleet_migrate.head(),)]
    assert len(legacy.execute("SELECT * FROM {t}rollout_events")) == 5


def _shape(url: str, prefix: str) -> dict[str, Any]:
    """Columns (type, nullability), keys and indexes of a fleet's tables, prefix removed."""
    engine = fleet_engine(url)  # no migration
    try:
        with engine.connect() as connection:
            inspector = inspect(connection)
            shape: dict[str, Any] = {}
            for name in TABLES:
                table = f"{prefix}{name}"
                primary = inspector.get_pk_constraint(table)["constrained_columns"]
                shape[name] = {
                    # SQLite lets a key that is not an INTEGER PRIMARY KEY hold NULL (its
                    # old quirk, which the legacy DDL inherited); 0001 says NOT NULL, as
                    # PostgreSQL always had it. Nothing ever wrote a NULL key.
                    "columns": [
                        (
                            c["name"],
                            str(c["type"]),
                            c["nullable"] and c["name"] not in primary,
                            bool(c.get("identity")),
                        )
                        for c in inspector.get_columns(table)
                    ],
                    "primary": primary,
                    "unique": sorted(
                        tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                    ),
                    "indexes": sorted(
                        (i["name"].removeprefix(prefix), tuple(i["column_names"]), i["unique"])
                        for i in inspector.get_indexes(table)
                        if not i["name"].startswith("sqlite_autoindex")
                    ),
                }
            return shape
    finally:
        engine.dispose()


def test_revision_0001_makes_the_schema_the_code_before_migrations_made(empty: Legacy) -> None:
    for statement in LEGACY_DDL:
        empty.execute(statement)
    assert_shaped_like_a_fresh_fleet(empty)


def assert_shaped_like_a_fresh_fleet(database: Legacy) -> None:
    """The tables of ``database`` have the shape 0001 gives a fleet created now."""
    fresh = f"n{uuid.uuid4().hex[:12]}_"
    FleetDB(database.url, prefix=fresh).close()
    try:
        assert _shape(database.url, fresh) == _shape(database.url, database.prefix)
    finally:
        for name in (*TABLES, VERSION_TABLE):
            database.execute(f"DROP TABLE IF EXISTS {fresh}{name}")


def test_a_database_an_older_release_left_with_some_tables_gets_the_rest(empty: Legacy) -> None:
    """The code before migrations created its tables as each was added; a database that
    an older release left without the newer ones (the lease, the wave log, the dropped
    counts) opens: revision 0001 adds what is missing, keeps the rest and its rows."""
    kept = LEGACY_DDL[:6]  # devices ... rollout_events and its index
    for statement in kept:
        empty.execute(statement)
    empty.execute("INSERT INTO {t}devices VALUES ('d1', 1, '0.8.0', 'cpu', '{}', '{}', '{}', 10.0)")
    db = FleetDB(empty.url, prefix=empty.prefix)
    try:
        assert db.schema_revision() == fleet_migrate.head()
        assert [d.device for d in db.list_devices()] == ["d1"]
        db.add_drops({"bad_signature": 2})  # a table that was missing
        assert db.intake_drops() == {"bad_signature": 2}
        assert db.take_lease("rollouts", "ctl-a", 100.0, 5.0, seq=1) is not None
    finally:
        db.close()
    assert_shaped_like_a_fresh_fleet(empty)


def _with_revision_0002(tmp_path: Path) -> Config:
    """The shipped migrations plus a throwaway 0002: a column and an index on a table
    with rows (on SQLite, a batch operation, which copies the table)."""
    scripts = tmp_path / "migrations"
    shutil.copytree(fleet_migrate.MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "v0002_throwaway.py").write_text(
        '''"""A throwaway revision for the test."""
import sqlalchemy as sa
from alembic import context, op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    t = context.config.attributes["prefix"]
    with op.batch_alter_table(f"{t}rollout_devices") as batch:
        batch.add_column(sa.Column("note", sa.Text, nullable=False, server_default="none"))
        batch.create_index(f"{t}rollout_devices_by_step", ["rollout_id", "step"])


def downgrade() -> None:
    t = context.config.attributes["prefix"]
    with op.batch_alter_table(f"{t}rollout_devices") as batch:
        batch.drop_index(f"{t}rollout_devices_by_step")
        batch.drop_column("note")
'''
    )
    config = Config()
    config.set_main_option("script_location", str(scripts))
    return config


def test_a_later_migration_keeps_the_rows(legacy: Legacy, tmp_path: Path) -> None:
    db = FleetDB(legacy.url, prefix=legacy.prefix)
    config = _with_revision_0002(tmp_path)
    config.attributes["prefix"] = legacy.prefix
    try:
        with db.engine.connect() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            connection.commit()
        assert legacy.version() == [("0002",)]
        notes = legacy.execute("SELECT device, step, note FROM {t}rollout_devices ORDER BY device")
        assert notes == [("d1", "committed", "none"), ("d2", None, "none")]
        # The code at 0001 still reads and writes it (it names its columns).
        assert [(d.device, d.step) for d in db.rollout_devices("r1")] == [
            ("d1", "committed"),
            ("d2", None),
        ]
        assert db.committed_health("r1", 0) == [HEALTH]
        assert db.mark_devices("r1", ["d2"], "ordered", 100.0, column="ordered_at") == 1
        db.close()
        # A release that does not know 0002 refuses the database instead of guessing.
        with pytest.raises(Unsupported, match="revision 0002"):
            FleetDB(legacy.url, prefix=legacy.prefix)
        engine = fleet_engine(legacy.url)
        with engine.connect() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
            connection.commit()
        engine.dispose()
        assert legacy.version() == [("0001",)]
        reopened = FleetDB(legacy.url, prefix=legacy.prefix)
        steps = [(d.device, d.step) for d in reopened.rollout_devices("r1")]
        reopened.close()
        assert steps == [("d1", "committed"), ("d2", "ordered")]
    finally:
        with contextlib.suppress(Exception):
            db.close()


def test_controllers_starting_together_migrate_once(empty: Legacy) -> None:
    opened: list[FleetDB] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(FleetDB(empty.url, prefix=empty.prefix))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for db in opened:
        db.close()
    assert errors == [] and len(opened) == 4
    assert empty.version() == [(fleet_migrate.head(),)]


def test_the_cli_shows_and_upgrades_the_schema(empty: Legacy) -> None:
    from tether.cli import cli

    runner = CliRunner()
    base = ["fleet", "--database-url", empty.url]
    env = {"TETHER_FLEET_TABLE_PREFIX": empty.prefix}
    result = runner.invoke(cli, [*base, "db", "current"], env=env)
    assert result.exit_code == 0, result.output
    assert f"revision none (this release: {fleet_migrate.head()})" in result.output
    result = runner.invoke(cli, [*base, "db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert f"revision {fleet_migrate.head()} (head)" in result.output
    assert schema_revision(empty.url, prefix=empty.prefix) == fleet_migrate.head()
