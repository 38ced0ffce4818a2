"""The fleet database's tables, declared once for SQLite and PostgreSQL alike.

This is the schema the code reads and writes (:mod:`cloud.fleet_db`); the migrations in
``cloud/migrations/versions`` bring a database to it. Change a table here only together
with a new migration (docs/rollouts.md, "The fleet database"). Every table name starts
with the fleet's ``prefix``, so several fleets (and tests) share one database.

JSON values are stored as text; times are seconds since the epoch (``DOUBLE PRECISION``).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)
from sqlalchemy.types import DOUBLE_PRECISION

#: Alembic's own table, per prefix: ``{prefix}alembic_version``.
VERSION_TABLE = "alembic_version"


def _time(name: str, *, nullable: bool = False) -> Column[float]:
    return Column(name, DOUBLE_PRECISION(asdecimal=False), nullable=nullable)


@dataclass(frozen=True)
class FleetTables:
    """The tables of one fleet (one ``prefix``) in one :class:`MetaData`."""

    metadata: MetaData
    devices: Table
    manifests: Table
    rollouts: Table
    rollout_devices: Table
    rollout_events: Table
    wave_log: Table
    leases: Table
    intake_drops: Table


def fleet_tables(prefix: str) -> FleetTables:
    """The tables, named ``{prefix}devices`` and so on."""
    metadata = MetaData()
    devices = Table(
        f"{prefix}devices",
        metadata,
        Column("device", Text, primary_key=True),
        Column("online", Integer, nullable=False),
        Column("agent_version", Text, nullable=False),
        Column("hardware", Text, nullable=False),
        Column("labels", Text, nullable=False),
        Column("models", Text, nullable=False),
        Column("health", Text, nullable=False),
        _time("last_seen"),
    )
    manifests = Table(
        f"{prefix}manifests",
        metadata,
        Column("model", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("sha256", Text, nullable=False),
        Column("size", BigInteger, nullable=False),
        Column("signed", Text, nullable=False),
        _time("created_at"),
        PrimaryKeyConstraint("model", "version"),
    )
    rollouts = Table(
        f"{prefix}rollouts",
        metadata,
        Column("id", Text, primary_key=True),
        Column("rollout_key", Text, nullable=False, unique=True),
        Column("model", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("selector", Text, nullable=False),
        Column("policy", Text, nullable=False),
        Column("state", Text, nullable=False),
        Column("wave", Integer, nullable=False),
        _time("wave_started_at", nullable=True),
        Column("reason", Text, nullable=False),
        _time("created_at"),
        _time("updated_at"),
    )
    rollout_devices = Table(
        f"{prefix}rollout_devices",
        metadata,
        Column("rollout_id", Text, nullable=False),
        Column("device", Text, nullable=False),
        Column("wave", Integer, nullable=False),
        Column("previous_version", Integer),
        Column("step", Text),
        Column("reason", Text, nullable=False),
        Column("health", Text),
        _time("ordered_at", nullable=True),
        _time("active_at", nullable=True),
        _time("rollback_at", nullable=True),
        _time("updated_at", nullable=True),
        PrimaryKeyConstraint("rollout_id", "device"),
    )
    rollout_events = Table(
        f"{prefix}rollout_events",
        metadata,
        # BIGINT identity on PostgreSQL; SQLite's INTEGER PRIMARY KEY AUTOINCREMENT.
        Column(
            "id",
            BigInteger().with_variant(Integer, "sqlite"),
            Identity(always=True),
            primary_key=True,
        ),
        Column("rollout_id", Text, nullable=False),
        Column("device", Text, nullable=False),
        Column("version", Integer, nullable=False),
        Column("step", Text, nullable=False),
        Column("reason", Text, nullable=False),
        Column("health", Text),
        _time("at"),
        Index(f"{prefix}rollout_events_by_device", "rollout_id", "device"),
        sqlite_autoincrement=True,
    )
    wave_log = Table(
        f"{prefix}wave_log",
        metadata,
        Column("rollout_id", Text, nullable=False),
        Column("wave", Integer, nullable=False),
        Column("holder", Text, nullable=False),
        Column("epoch", BigInteger, nullable=False),
        _time("at"),
        PrimaryKeyConstraint("rollout_id", "wave"),
    )
    leases = Table(
        f"{prefix}leases",
        metadata,
        Column("name", Text, primary_key=True),
        Column("holder", Text, nullable=False),
        Column("epoch", BigInteger, nullable=False),
        _time("expires_at"),
        Column("seq", BigInteger, nullable=False),
    )
    intake_drops = Table(
        f"{prefix}intake_drops",
        metadata,
        Column("reason", Text, primary_key=True),
        Column("count", BigInteger, nullable=False),
    )
    return FleetTables(
        metadata,
        devices,
        manifests,
        rollouts,
        rollout_devices,
        rollout_events,
        wave_log,
        leases,
        intake_drops,
    )
