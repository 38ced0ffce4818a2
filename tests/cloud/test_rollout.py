"""The rollout controller against a real broker, artifact server and simulated devices."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.rollout import request_abort, request_pause, request_resume, start_rollout
from harness.broker import Broker
from harness.fleet import BACKENDS, FleetHarness, open_db, policy, wait_for
from harness.fleet_sim import Behaviour
from shared.errors import InvalidInput


@pytest.fixture(params=["sqlite"])
def fleet(request: pytest.FixtureRequest, broker: Broker, tmp_path: Path) -> Iterator[FleetHarness]:
    db = open_db(request.param, tmp_path)
    harness = FleetHarness(broker.url, db, tmp_path)
    try:
        yield harness
    finally:
        harness.close()
        db.drop_schema()
        db.close()


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_good_rollout_goes_wave_by_wave_to_every_device(fleet: FleetHarness) -> None:
    fleet.publish("digits", 1)
    fleet.publish("digits", 2)
    devices = fleet.add_devices(60)
    others = fleet.add_devices(5, labels={"site": "elsewhere"})

    rollout, created = start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy())
    assert created
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}, 30) == "completed"

    rows = fleet.db.rollout_devices(rollout.id)
    assert len(rows) == 60
    assert [sum(1 for r in rows if r.wave == w) for w in range(4)] == [1, 5, 24, 30]
    assert all(r.step == "committed" and r.previous_version == 1 for r in rows)
    assert all(d.models["digits"] == 2 for d in devices)
    assert all(not d.orders for d in others)
    # Each wave was ordered only after the previous one had committed.
    for wave in range(1, 4):
        ordered = min(r.ordered_at or 0 for r in rows if r.wave == wave)
        committed = [
            at
            for r in rows
            if r.wave == wave - 1
            for step, _, at in fleet.db.device_history(rollout.id, r.device)
            if step == "committed"
        ]
        assert ordered >= max(committed) - 0.05
    # Downloads were resumed with Range requests.
    assert {s for d in devices for s in d.download_statuses} == {206}
    # The fleet table learned the new versions from the devices' retained status.
    wait_for(
        lambda: all(
            d.active_version("digits") == 2 for d in fleet.db.list_devices(fleet.sel(site="lab"))
        ),
        5,
    )


def test_reapplying_the_same_rollout_returns_it(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    fleet.add_devices(3)
    first, created = start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy())
    again, created_again = start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy())
    assert created and not created_again
    assert again.id == first.id
    fleet.wait_state(first.id, {"completed"})
    done, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy())
    assert done.id == first.id


def test_devices_in_an_unfinished_rollout_are_not_taken_twice(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    fleet.publish("digits", 3)
    fleet.add_devices(3)
    start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy(window_s=5.0))
    with pytest.raises(InvalidInput, match="another unfinished rollout"):
        start_rollout(fleet.db, "digits", 3, fleet.sel(), policy())


def test_canary_failing_its_self_test_stops_at_wave_one_and_rolls_back(
    fleet: FleetHarness,
) -> None:
    fleet.publish("digits", 2)
    devices = fleet.add_devices(20, behaviour=lambda i: Behaviour(self_test_fails=True))
    rollout, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(site="lab"), policy())
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == "rolled_back"

    record = fleet.db.rollout(rollout.id)
    assert "wave 1" in record.reason and "self-test failed" in record.reason
    ordered = [d for d in devices if d.orders]
    assert len(ordered) == 1  # only the canary ever heard of version 2
    canary = ordered[0]
    assert [o.action for o in canary.orders] == ["install", "rollback"]
    assert canary.orders[1].rollback_to == 1
    assert canary.models["digits"] == 1
    assert ("failed", "self-test failed: outputs are NaN") in canary.steps


def test_canary_with_low_shadow_agreement_is_rolled_back(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    devices = fleet.add_devices(
        10,
        behaviour=lambda i: Behaviour(shadow_agreement=0.80, baseline_shadow_agreement=0.97),
    )
    rollout, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(), policy())
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == "rolled_back"
    assert "shadow agreement" in fleet.db.rollout(rollout.id).reason
    canary = next(d for d in devices if d.orders)
    assert [step for step, _ in canary.steps][-2:] == ["committed", "rolled_back"]
    assert canary.models["digits"] == 1
    assert sum(1 for d in devices if d.orders) == 1


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_a_wave_without_evidence_fails_and_with_it_passes(fleet: FleetHarness) -> None:
    """Devices whose new version answered no requests, or sent no shadow samples to the
    teacher, give the gate nothing to judge: the wave fails, naming what is missing."""
    fleet.publish("digits", 2)
    idle = fleet.add_devices(3, labels={"group": "idle"}, behaviour=lambda i: Behaviour(requests=0))
    unsampled = fleet.add_devices(
        3, labels={"group": "unsampled"}, behaviour=lambda i: Behaviour(shadow_samples=0)
    )
    fleet.add_devices(3, labels={"group": "measured"})
    quick = policy(waves=["1", "100%"])
    started = {
        group: start_rollout(fleet.db, "digits", 2, fleet.sel(group=group), quick)[0].id
        for group in ("idle", "unsampled", "measured")
    }
    final = {g: fleet.wait_state(rid, {"completed", "rolled_back"}) for g, rid in started.items()}
    assert final == {"idle": "rolled_back", "unsampled": "rolled_back", "measured": "completed"}
    reason = fleet.db.rollout(started["idle"]).reason
    assert "wave 1: no evidence: 0 requests" in reason and "min_requests 1" in reason, reason
    reason = fleet.db.rollout(started["unsampled"]).reason
    assert "wave 1: no evidence: 0 shadow samples" in reason, reason
    for group in (idle, unsampled):  # stopped at the canary, which went back
        assert sum(1 for d in group if d.orders) == 1
        assert all(d.models["digits"] == 1 for d in group)


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_the_agreement_gate_fails_without_baseline_samples(fleet: FleetHarness) -> None:
    """The new version's agreement with the teacher is judged against the previous
    version's. Devices that measured no baseline, and devices of schema 1.1 (their reports
    say nothing of how many samples the baseline rests on), give the gate nothing to
    compare with: the wave fails, naming the baseline. Measured baselines pass."""
    fleet.publish("digits", 2)
    unmeasured = fleet.add_devices(
        3,
        labels={"group": "unmeasured"},
        behaviour=lambda i: Behaviour(baseline_shadow_agreement=None, baseline_shadow_samples=0),
    )
    old = fleet.add_devices(3, labels={"group": "old"}, behaviour=lambda i: Behaviour(schema="1.1"))
    measured = fleet.add_devices(3, labels={"group": "measured"})
    quick = policy(waves=["1", "100%"], min_baseline_samples=20)
    started = {
        group: start_rollout(fleet.db, "digits", 2, fleet.sel(group=group), quick)[0].id
        for group in ("unmeasured", "old", "measured")
    }
    final = {g: fleet.wait_state(rid, {"completed", "rolled_back"}) for g, rid in started.items()}
    assert final == {"unmeasured": "rolled_back", "old": "rolled_back", "measured": "completed"}
    for group in ("unmeasured", "old"):
        reason = fleet.db.rollout(started[group]).reason
        assert "wave 1: no evidence: 0 baseline shadow samples" in reason, reason
        assert "min_baseline_samples 20" in reason, reason
    for devices in (unmeasured, old):  # stopped at the canary, which went back
        assert sum(1 for d in devices if d.orders) == 1
        assert all(d.models["digits"] == 1 for d in devices)
    assert all(d.models["digits"] == 2 for d in measured)


def test_p99_regression_fails_the_gate(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    fleet.add_devices(4, behaviour=lambda i: Behaviour(p99_ms=40.0, baseline_p99_ms=10.0))
    rollout, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(), policy(waves=["2", "100%"]))
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == "rolled_back"
    assert "p99 latency is 4.00x" in fleet.db.rollout(rollout.id).reason


def test_abort_mid_wave_rolls_back_every_updated_device(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    devices = fleet.add_devices(20)
    rollout, _ = start_rollout(
        fleet.db, "digits", 2, fleet.sel(), policy(waves=["5", "100%"], window_s=30.0)
    )
    wait_for(
        lambda: sum(1 for r in fleet.db.rollout_devices(rollout.id) if r.step == "active") == 5,
        10,
        "the first wave to be active",
    )
    assert request_abort(fleet.db, rollout.id)
    started = time.monotonic()
    assert fleet.wait_state(rollout.id, {"rolled_back"}) == "rolled_back"
    assert time.monotonic() - started < 3
    assert all(d.models["digits"] == 1 for d in devices)
    assert sum(1 for d in devices if d.orders) == 5
    assert fleet.db.rollout(rollout.id).reason == "aborted by operator"
    assert not request_abort(fleet.db, rollout.id)  # finished: nothing to abort


def test_pause_holds_the_next_wave_until_resumed(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    devices = fleet.add_devices(10)
    rollout, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(), policy(waves=["1", "100%"]))
    assert request_pause(fleet.db, rollout.id)
    time.sleep(1.0)
    assert fleet.db.rollout(rollout.id).state == "paused"
    assert sum(1 for d in devices if d.orders) <= 1
    assert not request_pause(fleet.db, rollout.id)
    assert request_resume(fleet.db, rollout.id)
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == "completed"
    assert all(d.models["digits"] == 2 for d in devices)


@pytest.mark.parametrize(("max_failure", "outcome"), [("1", "completed"), ("0", "rolled_back")])
def test_a_silent_device_times_out_and_counts_against_the_gate(
    fleet: FleetHarness, max_failure: str, outcome: str
) -> None:
    fleet.publish("digits", 2)
    devices = fleet.add_devices(8, behaviour=lambda i: Behaviour(silent=i == 3))
    rollout, _ = start_rollout(
        fleet.db,
        "digits",
        2,
        fleet.sel(),
        policy(waves=["100%"], max_failure=max_failure, device_timeout_s=2.0),
    )
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == outcome
    silent = fleet.db.rollout_devices(rollout.id)
    row = next(r for r in silent if r.device == devices[3].name)
    assert row.step == "timeout"
    if outcome == "rolled_back":
        assert "timeout" in fleet.db.rollout(rollout.id).reason
        assert all(d.models["digits"] == 1 for d in devices)


def test_an_unsigned_or_foreign_manifest_is_refused_and_counted(fleet: FleetHarness) -> None:
    from shared.manifest import generate_key

    fleet.publish("digits", 2)
    fleet.add_devices(3)
    for device in fleet.devices:
        device.trusted_keys = [generate_key().public_key()]
    rollout, _ = start_rollout(fleet.db, "digits", 2, fleet.sel(), policy(waves=["100%"]))
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}) == "rolled_back"
    # Devices that refused are not waited for; they confirm the rollback order on their own.
    wait_for(
        lambda: {r.step for r in fleet.db.rollout_devices(rollout.id)} == {"rolled_back"},
        10,
        "every device to confirm the rollback",
    )
    rows = fleet.db.rollout_devices(rollout.id)
    history = fleet.db.device_history(rollout.id, rows[0].device)
    assert any(s == "refused" and "untrusted key" in r for s, r, _ in history)


def test_the_rollout_rate_paces_the_orders(fleet: FleetHarness) -> None:
    fleet.publish("digits", 2)
    fleet.add_devices(10)
    rollout, _ = start_rollout(
        fleet.db,
        "digits",
        2,
        fleet.sel(site="lab"),
        policy(waves=["100%"], window_s=0.0, rate_per_minute=120),  # two a second
    )
    assert fleet.wait_state(rollout.id, {"completed", "rolled_back"}, 60) == "completed"
    times = sorted(r.ordered_at or 0 for r in fleet.db.rollout_devices(rollout.id))
    for index, at in enumerate(times):
        assert at - times[0] >= index / 2 - 0.6  # never ahead of the pace (one tick slack)
    assert times[-1] - times[0] >= 4.0
