"""Late devices: 30 % of the fleet is offline when a rollout starts and comes online during
it. Real Mosquitto (last wills), PostgreSQL, artifact server, registry and controller; the
fleet is the swarm simulator (harness/fleet_swarm.py) speaking the signed-order protocol."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.fleet_status import render
from cloud.rollout import start_rollout
from harness.broker import Broker
from harness.fleet import FleetHarness, open_db, policy, wait_for
from harness.fleet_swarm import Swarm
from shared.manifest import public_key_text

DEVICES = 20
OFFLINE = 6  # 30 %


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker) -> Iterator[tuple[FleetHarness, Swarm]]:
    db = open_db("postgresql", tmp_path)
    harness = FleetHarness(broker.url, db, tmp_path)
    swarm = Swarm(
        broker.url,
        [public_key_text(harness.key)],
        DEVICES,
        processes=2,
        prefix=f"late{harness.run}",
        labels={"run": harness.run},
    )
    try:
        assert swarm.connect() == DEVICES
        wait_for(lambda: len(db.list_devices(harness.sel())) == DEVICES, 30, "statuses")
        swarm.offline(swarm.names[:OFFLINE], will=True)
        wait_for(
            lambda: sum(1 for d in db.list_devices(harness.sel()) if not d.online) == OFFLINE,
            30,
            "the last wills",
        )
        yield harness, swarm
    finally:
        swarm.stop()
        harness.close()
        db.drop_schema()
        db.close()


def versions(swarm: Swarm) -> dict[str, int | None]:
    return {name: d["models"].get("digits") for name, d in swarm.state().items()}


def test_devices_offline_at_the_start_get_the_order_when_they_come_online(
    fleet: tuple[FleetHarness, Swarm],
) -> None:
    harness, swarm = fleet
    db = harness.db
    late = swarm.names[:OFFLINE]
    harness.publish("digits", 2)
    rollout, _ = start_rollout(db, "digits", 2, harness.sel(), policy(window_s=0.2, until_s=300))
    assert {d.device for d in db.rollout_devices(rollout.id)} == set(swarm.names)
    # Every online device is done and the last wave passed: the target set stays open.
    online = set(swarm.names) - set(late)
    wait_for(
        lambda: (
            {d.device for d in db.rollout_devices(rollout.id) if d.step == "committed"} == online
        ),
        60,
        "the online devices to commit",
    )
    wait_for(lambda: db.rollout(rollout.id).wave == 3, 30, "the last wave")
    assert db.rollout(rollout.id).state == "running"
    text = "\n".join(render(db))
    assert f"{DEVICES - OFFLINE} done, {OFFLINE} pending ({OFFLINE} offline), 0 failed" in text

    assert swarm.connect(late[:3]) == 3  # back one group at a time, while it runs
    wait_for(
        lambda: (
            sum(1 for d in db.rollout_devices(rollout.id) if d.step == "committed") == DEVICES - 3
        ),
        60,
        "the first late devices to commit",
    )
    assert db.rollout(rollout.id).state == "running"
    assert swarm.connect(late[3:]) == 3
    assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 60) == "completed"
    assert set(versions(swarm).values()) == {2}
    assert f"{DEVICES} done, 0 pending (0 offline), 0 failed" in "\n".join(render(db))


def test_devices_back_after_a_rollback_end_on_the_rollback_target(
    fleet: tuple[FleetHarness, Swarm],
) -> None:
    harness, swarm = fleet
    db = harness.db
    late = swarm.names[:OFFLINE]
    harness.publish("digits", 2)
    rollout, _ = start_rollout(
        db,
        "digits",
        2,
        harness.sel(),
        policy(window_s=3.0, device_timeout_s=3.0, max_failure="0", until_s=300),
    )
    # The canary installs, then drops off mid-window: it never commits, the rollout rolls
    # back and its rollback order waits, retained, for it.
    wait_for(
        lambda: any(d.step == "active" for d in db.rollout_devices(rollout.id)),
        30,
        "the canary to be active",
    )
    canary = next(d.device for d in db.rollout_devices(rollout.id) if d.step == "active")
    swarm.offline([canary], will=True)
    assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 60) == "rolled_back"
    assert versions(swarm)[canary] == 2  # its own memory, while it is away

    assert swarm.connect([canary, *late]) == OFFLINE + 1
    wait_for(lambda: versions(swarm)[canary] == 1, 30, "the canary to roll back")
    wait_for(
        lambda: (
            next(d for d in db.rollout_devices(rollout.id) if d.device == canary).step
            == "rolled_back"
        ),
        30,
        "the canary's late rollback to be recorded",
    )
    state = swarm.state()
    assert set(versions(swarm).values()) == {1}
    # The late devices never got the bad version's install: the final decision is "stay".
    assert all("received" not in state[name]["steps"] for name in late)
