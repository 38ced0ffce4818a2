"""Bringing a fleet database to the schema the code expects: Alembic, run on open.

The migrations live in ``cloud/migrations`` (shipped with the package) and are run here
with a programmatic configuration, no ``alembic.ini``. Alembic records the revision in
``{prefix}alembic_version``, one per fleet like every other table.

One process migrates at a time: the whole upgrade is one transaction that first takes a
PostgreSQL advisory lock (or SQLite's write lock), so two controllers starting together
do not race; the second finds the database at head and does nothing. A database that the
code before Alembic created (all tables of revision 0001, no version table) is stamped
with 0001 instead of being created again; one that an older release left with only some of
those tables gets the missing ones from revision 0001, which leaves existing tables alone.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from cloud.fleet_schema import VERSION_TABLE
from shared.errors import Unsupported

log = logging.getLogger(__name__)
# Alembic says "Context impl ..., will assume transactional DDL" at INFO on every open;
# what changed is logged here instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).parent / "migrations"
#: The revision a database made by the code before migrations is at.
BASELINE = "0001"
#: Revision 0001's tables (without the prefix): what such a database has.
BASELINE_TABLES = (
    "devices",
    "manifests",
    "rollouts",
    "rollout_devices",
    "rollout_events",
    "wave_log",
    "leases",
    "intake_drops",
)


def _config(connection: Connection | None = None, prefix: str = "") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["prefix"] = prefix
    return config


def head() -> str:
    """The newest revision this code knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None
    return revision


def current(connection: Connection, prefix: str) -> str | None:
    """The revision the database is at (``None``: never migrated)."""
    context = MigrationContext.configure(
        connection, opts={"version_table": f"{prefix}{VERSION_TABLE}"}
    )
    return context.get_current_revision()


def lock_key(prefix: str) -> int:
    """The PostgreSQL advisory lock (a signed 64-bit key) that serialises migrations of
    one fleet (one prefix)."""
    digest = hashlib.sha256(f"tether-fleet-migrations:{prefix}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def upgrade(connection: Connection, prefix: str, revision: str = "head") -> None:
    """Migrate to ``revision`` in one transaction, one process at a time.

    ``connection`` must not be in autocommit mode and not be in a transaction.
    """
    with connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(prefix)}
            )
        else:
            # Deferred transactions would let two processes both see "no tables" first.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        config = _config(connection, prefix)
        found = current(connection, prefix)
        known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
        if found is not None and found not in known:
            raise Unsupported(
                f"the fleet database's schema is at revision {found}, which this release does "
                "not know (a newer release migrated it): run that release or a newer one"
            )
        legacy = _tables_before_migrations(connection, prefix)
        if len(legacy) == len(BASELINE_TABLES):
            log.info("fleet database from before migrations: stamping revision %s", BASELINE)
            command.stamp(config, BASELINE)
            found = BASELINE
        elif legacy:
            missing = sorted(set(BASELINE_TABLES) - legacy)
            log.info(
                "fleet database from an older release without %s: revision %s adds them",
                ", ".join(missing),
                BASELINE,
            )
        command.upgrade(config, revision)
        now = current(connection, prefix)
        if now != found:
            log.info("fleet database schema migrated from %s to %s", found or "nothing", now)


def _tables_before_migrations(connection: Connection, prefix: str) -> set[str]:
    """The tables of revision 0001 (unprefixed) in a database never migrated; none once it
    has a version table."""
    names = set(inspect(connection).get_table_names())
    if f"{prefix}{VERSION_TABLE}" in names:
        return set()
    return {name for name in BASELINE_TABLES if f"{prefix}{name}" in names}
