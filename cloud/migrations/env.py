"""Alembic's environment for the fleet database.

Run only through :func:`cloud.fleet_migrate.upgrade` (no ``alembic.ini``): the caller
hands over an open connection and the table prefix in ``config.attributes``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from cloud.fleet_schema import VERSION_TABLE


def run_migrations_online() -> None:
    connection: Connection = context.config.attributes["connection"]
    prefix: str = context.config.attributes["prefix"]
    context.configure(
        connection=connection,
        version_table=f"{prefix}{VERSION_TABLE}",
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("the fleet database is migrated online only (tether fleet db upgrade)")
run_migrations_online()
