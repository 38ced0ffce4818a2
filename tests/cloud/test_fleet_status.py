"""``tether fleet status`` renders devices and rollouts from the fleet database."""

from __future__ import annotations

from pathlib import Path

from cloud.fleet_db import FleetDB
from cloud.fleet_status import bar, render


def test_bar() -> None:
    assert bar(3, 12, width=12) == "[###---------]    3/12"
    assert bar(0, 0, width=4) == "[----]    0/0"


def test_empty_fleet_says_how_to_start(tmp_path: Path) -> None:
    db = FleetDB(f"sqlite:///{tmp_path / 'fleet.db'}")
    text = "\n".join(render(db))
    assert "Devices: 0 (0 online, 0 offline)" in text
    assert "tether fleet rollout start" in text
