"""Alembic migrations of the fleet database (run by :mod:`cloud.fleet_migrate`)."""
