"""Fixtures shared by the whole suite: real brokers, model repositories, running agents."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker

ROOT = Path(__file__).resolve().parent.parent
REPOSITORY = ROOT / "models" / "repository"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Mosquitto for the session; tests that kill it use ``fresh_broker`` instead."""
    instance = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield instance
    instance.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Broker]:
    """A Mosquitto of this test's own, free to kill and restart."""
    instance = Broker(tmp_path / "mosquitto").start()
    yield instance
    instance.stop()
