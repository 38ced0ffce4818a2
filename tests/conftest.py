"""Fixtures shared by the whole suite: real brokers, model repositories, running agents."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.broker import Broker
from tests.postgres import PrivatePostgres, ensure_postgres

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"


_private_postgres: list[PrivatePostgres] = []

# Every agent a test starts (directly, or through `tether up`) serves gRPC only when the test
# asks for a port: with the default (8001) agents running side by side would collide.
os.environ.setdefault("TETHER_GRPC__PORT", "0")


def pytest_configure(config: pytest.Config) -> None:
    """Point the fleet tests at a PostgreSQL (the machine's, or a private one) before any
    test module reads ``TETHER_TEST_POSTGRES_URL``."""
    try:
        url, private = ensure_postgres()
    except Exception as exc:  # the PostgreSQL tests then fail (never skip), naming the cause
        os.environ.setdefault("TETHER_TEST_POSTGRES_URL", "postgresql://unavailable/")
        print(f"\nno PostgreSQL for the fleet tests: {exc}", file=sys.stderr)
        return
    os.environ["TETHER_TEST_POSTGRES_URL"] = url
    if private is not None:
        _private_postgres.append(private)


def pytest_unconfigure(config: pytest.Config) -> None:
    while _private_postgres:
        _private_postgres.pop().stop()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Mosquitto for the session; tests that kill it use ``fresh_broker`` instead."""
    instance = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def stock_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One stock Mosquitto 2.0 for the session (only a listener): the broker users run."""
    instance = Broker(tmp_path_factory.mktemp("mosquitto-stock"), stock=True).start()
    yield instance
    instance.stop()


@pytest.fixture
def fresh_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of this test's own, free to kill and restart; tuned unless a test
    parametrizes it indirectly with ``"stock"``."""
    stock = getattr(request, "param", "tuned") == "stock"
    instance = Broker(tmp_path / "mosquitto", stock=stock).start()
    yield instance
    instance.stop()
