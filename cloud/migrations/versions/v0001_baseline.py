"""The fleet schema as it was before migrations (``CREATE TABLE IF NOT EXISTS``).

Frozen: the schema this revision makes never changes. A database that the code before
Alembic created has exactly these tables; it is stamped with this revision instead of
running it (:func:`cloud.fleet_migrate.upgrade`). One that an older release left with only
some of them (the code of then created its tables when it opened the database, as each was
added) gets the missing ones here, as that code would have made them: a table that exists
is left as it is.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.types import DOUBLE_PRECISION

from cloud.fleet_migrate import BASELINE_TABLES

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _time(name: str, *, nullable: bool = False) -> sa.Column[float]:
    return sa.Column(name, DOUBLE_PRECISION(asdecimal=False), nullable=nullable)


def upgrade() -> None:
    t = context.config.attributes["prefix"]
    existing = set(sa.inspect(op.get_bind()).get_table_names())

    def create_table(name: str, *parts: Any, **options: Any) -> bool:
        if name in existing:
            return False
        op.create_table(name, *parts, **options)
        return True

    create_table(
        f"{t}devices",
        sa.Column("device", sa.Text, primary_key=True),
        sa.Column("online", sa.Integer, nullable=False),
        sa.Column("agent_version", sa.Text, nullable=False),
        sa.Column("hardware", sa.Text, nullable=False),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("health", sa.Text, nullable=False),
        _time("last_seen"),
    )
    create_table(
        f"{t}manifests",
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("sha256", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("signed", sa.Text, nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("model", "version"),
    )
    create_table(
        f"{t}rollouts",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("rollout_key", sa.Text, nullable=False, unique=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("selector", sa.Text, nullable=False),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        _time("wave_started_at", nullable=True),
        sa.Column("reason", sa.Text, nullable=False),
        _time("created_at"),
        _time("updated_at"),
    )
    create_table(
        f"{t}rollout_devices",
        sa.Column("rollout_id", sa.Text, nullable=False),
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("previous_version", sa.Integer),
        sa.Column("step", sa.Text),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("health", sa.Text),
        _time("ordered_at", nullable=True),
        _time("active_at", nullable=True),
        _time("rollback_at", nullable=True),
        _time("updated_at", nullable=True),
        sa.PrimaryKeyConstraint("rollout_id", "device"),
    )
    events = create_table(
        f"{t}rollout_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            sa.Identity(always=True),
            primary_key=True,
        ),
        sa.Column("rollout_id", sa.Text, nullable=False),
        sa.Column("device", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("step", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("health", sa.Text),
        _time("at"),
        sqlite_autoincrement=True,
    )
    if events:
        op.create_index(
            f"{t}rollout_events_by_device", f"{t}rollout_events", ["rollout_id", "device"]
        )
    create_table(
        f"{t}wave_log",
        sa.Column("rollout_id", sa.Text, nullable=False),
        sa.Column("wave", sa.Integer, nullable=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        _time("at"),
        sa.PrimaryKeyConstraint("rollout_id", "wave"),
    )
    create_table(
        f"{t}leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        _time("expires_at"),
        sa.Column("seq", sa.BigInteger, nullable=False),
    )
    create_table(
        f"{t}intake_drops",
        sa.Column("reason", sa.Text, primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    t = context.config.attributes["prefix"]
    for name in reversed(BASELINE_TABLES):
        op.drop_table(f"{t}{name}")
