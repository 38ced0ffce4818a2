"""The fleet-scale simulator (harness/fleet_swarm.py) speaks the real protocol: a real
controller rolls a version out to it, and its devices' last wills mark them offline."""

from __future__ import annotations

from pathlib import Path

from cloud.rollout import start_rollout
from harness.broker import Broker
from harness.fleet import FleetHarness, open_db, policy, wait_for
from harness.fleet_swarm import Swarm
from shared.manifest import public_key_text

DEVICES = 24


def test_a_swarm_follows_a_rollout_and_its_wills_mark_devices_offline(
    broker: Broker, tmp_path: Path
) -> None:
    db = open_db("sqlite", tmp_path)
    harness = FleetHarness(broker.url, db, tmp_path)
    swarm = Swarm(
        broker.url,
        [public_key_text(harness.key)],
        DEVICES,
        processes=2,
        prefix=f"swarm{harness.run}",
        labels={"run": harness.run},
    )
    try:
        assert swarm.connect() == DEVICES
        selector = {"run": harness.run}
        wait_for(lambda: len(db.list_devices(selector)) == DEVICES, 30, "swarm statuses")
        size = harness.publish("digits", 2).manifest.size
        rollout, _ = start_rollout(db, "digits", 2, selector, policy(waves=["1", "50%", "100%"]))
        assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 60) == "completed"
        state = swarm.state()
        assert all(d["models"] == {"digits": 2} for d in state.values())
        assert all(d["steps"][-1] == "committed" and d["bytes"] == size for d in state.values())
        assert all(
            (record := db.get_device(name)) is not None and record.active_version("digits") == 2
            for name in swarm.names
        )

        gone = swarm.names[:3]
        swarm.offline(gone, will=True)
        wait_for(
            lambda: all(not d.online for d in db.list_devices(selector) if d.device in gone),
            30,
            "the last wills",
        )
        assert sum(1 for d in db.list_devices(selector) if d.online) == DEVICES - 3
        assert swarm.connect(gone) == 3
        wait_for(lambda: all(d.online for d in db.list_devices(selector)), 30, "the returns")
    finally:
        swarm.stop()
        harness.close()
        db.drop_schema()
        db.close()
