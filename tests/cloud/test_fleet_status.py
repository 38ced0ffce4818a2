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


def _fleet(tmp_path: Path) -> FleetDB:
    from cloud.rollout_policy import RolloutPolicy
    from shared.fleet import DeviceStatus

    db = FleetDB(f"sqlite:///{tmp_path / 'fleet.db'}")
    for i, online in enumerate([True, True, False]):
        db.upsert_device(
            f"cam-{i}",
            DeviceStatus(device=f"cam-{i}", online=online, labels={"site": "a"}),
            seen_at=1.0,
        )
    devices = [("cam-0", 0, 1), ("cam-1", 1, 1), ("cam-2", 1, 1)]
    db.create_rollout(
        "m-v2-x", "m", 2, {"site": "a"}, RolloutPolicy(waves=["1", "100%"]), devices, now=1.0
    )
    db.mark_devices("m-v2-x", ["cam-0"], "committed", now=2.0)
    return db


def test_status_shows_devices_and_rollout_progress(tmp_path: Path) -> None:
    text = "\n".join(render(_fleet(tmp_path)))
    assert "Devices: 3 (2 online, 1 offline)" in text
    assert "m-v2-x" in text and "1/3" in text
    assert "devices: 1 done, 2 pending (1 offline), 0 failed" in text


def test_rollout_metrics_for_the_dashboard(tmp_path: Path) -> None:
    from cloud.fleet_metrics import FleetMetrics

    text = FleetMetrics(_fleet(tmp_path)).render().decode()
    assert 'tether_fleet_devices{online="true"} 2.0' in text
    assert 'step="committed",version="2"} 1.0' in text
    assert 'tether_rollout_wave{rollout="m-v2-x"} 1.0' in text
