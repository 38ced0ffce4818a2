"""The fleet data-access layer, against SQLite and the real PostgreSQL alike.

The PostgreSQL variant never skips: an unreachable server fails the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.fleet_db import HARDWARE_KEY, FleetDB, sqlite_path
from harness.fleet import BACKENDS, open_db, policy
from shared.errors import InvalidInput, NotFound
from shared.fleet import DeviceStatus, HealthReport, ModelState, RolloutEvent
from shared.manifest import Manifest, SignedManifest, generate_key, sign_manifest


@pytest.fixture(params=BACKENDS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FleetDB]:
    db = open_db(request.param, tmp_path)
    yield db
    db.drop_schema()
    db.close()


def status(online: bool = True, active: int = 1, **labels: str) -> DeviceStatus:
    return DeviceStatus(
        device="ignored",
        online=online,
        agent_version="0.1.0",
        hardware="sm_87",
        labels=labels,
        models={"digits": ModelState(active=active, state="ready")},
        health={"cpu": 0.5},
        at=1.0,
    )


def signed(version: int, sha: str = "ab" * 32) -> SignedManifest:
    return sign_manifest(
        Manifest(
            model="digits",
            version=version,
            sha256=sha,
            size=10,
            url="http://x",
            created_at=1.0,
            expires_at=2.0,
        ),
        generate_key(),
    )


def test_schema_creation_is_idempotent(db: FleetDB) -> None:
    db.create_schema()
    db.create_schema()
    assert db.list_devices() == []


def test_devices_upsert_select_and_last_will(db: FleetDB) -> None:
    db.upsert_device("d1", status(site="a", ring="1"), 10.0)
    db.upsert_device("d2", status(site="b", ring="1", active=2), 11.0)
    db.upsert_device("d1", status(site="a", ring="2", active=3), 12.0)
    d1 = db.get_device("d1")
    assert d1 is not None
    assert d1.labels == {"site": "a", "ring": "2"} and d1.active_version("digits") == 3
    assert d1.hardware == "sm_87" and d1.online and d1.last_seen == 12.0
    assert [d.device for d in db.list_devices({"ring": "1"})] == ["d2"]
    assert [d.device for d in db.list_devices()] == ["d1", "d2"]
    # The last will says only "offline": the rest of what we know stays.
    db.upsert_device("d1", DeviceStatus.parse({"kind": "device_status", "online": False}), 13.0)
    d1 = db.get_device("d1")
    assert d1 is not None and not d1.online and d1.labels["site"] == "a"
    db.upsert_device("new", DeviceStatus(online=False), 14.0)
    assert db.get_device("new") is not None
    assert db.get_device("nobody") is None


def test_manifests_are_immutable_per_version(db: FleetDB) -> None:
    db.put_manifest(signed(1))
    db.put_manifest(signed(2))
    db.put_manifest(signed(2))  # the same artifact again: a no-op
    with pytest.raises(InvalidInput, match="already published"):
        db.put_manifest(signed(2, sha="cd" * 32))
    latest = db.latest_manifest("digits")
    assert latest is not None and latest.manifest.version == 2
    assert [s.manifest.version for s in db.list_manifests()] == [1, 2]
    assert db.get_manifest("digits", 7) is None


def test_rollouts_are_idempotent_and_states_move_only_from_allowed_ones(db: FleetDB) -> None:
    devices = [("d1", 0, 1), ("d2", 1, None)]
    first, created = db.create_rollout("r1", "digits", 2, {"site": "a"}, policy(), devices, 1.0)
    again, created_again = db.create_rollout(
        "r2", "digits", 2, {"site": "a"}, policy(), devices, 2.0
    )
    assert created and not created_again and again.id == "r1"
    assert first.policy == policy() and first.selector == {"site": "a"}
    assert db.rollout("r").id == "r1"  # a unique prefix finds it
    with pytest.raises(NotFound):
        db.rollout("zzz")
    assert db.set_rollout_state("r1", "paused", 3.0, only_from=("running",))
    assert not db.set_rollout_state("r1", "paused", 3.0, only_from=("running",))
    assert db.set_rollout_state("r1", "running", 4.0, wave=1, wave_started_at=4.0)
    record = db.rollout("r1")
    assert (record.state, record.wave, record.wave_started_at) == ("running", 1, 4.0)
    assert db.active_rollout_of(["d1", "d3"]) == {"d1": "r1"}
    db.set_rollout_state("r1", "completed", 5.0)
    assert db.active_rollout_of(["d1"]) == {}
    assert [r.id for r in db.list_rollouts(active_only=True)] == []
    rows = db.rollout_devices("r1")
    assert [(r.device, r.wave, r.previous_version, r.step) for r in rows] == [
        ("d1", 0, 1, None),
        ("d2", 1, None, None),
    ]


def test_events_record_history_latest_step_and_health(db: FleetDB) -> None:
    db.create_rollout("r1", "digits", 2, {}, policy(), [("d1", 0, 1)], 1.0)
    db.mark_devices("r1", ["d1"], "ordered", 2.0, column="ordered_at")
    health = HealthReport(requests=10, errors=1, shadow_samples=2, shadow_agreement=1.0)

    def event(step: str, at: float, report: HealthReport | None = None) -> RolloutEvent:
        return RolloutEvent(
            rollout_id="r1",
            model="digits",
            version=2,
            step=step,
            health=report,
            at=at,
        )

    db.record_events([("d1", event("received", 3.0), 3.1), ("d1", event("active", 4.0), 4.1)])
    db.record_events([("d1", event("active", 5.0, health), 5.1)])
    assert db.record_events([("d1", event("committed", 6.0), 6.1)]) == 0
    # A device not in the rollout leaves no row at all (no table grows from outside).
    assert db.record_events([("ghost", event("committed", 6.0), 6.1)]) == 1
    assert db.device_history("r1", "ghost") == []
    (row,) = db.rollout_devices("r1")
    assert row.step == "committed" and row.ordered_at == 2.0 and row.active_at == 4.1
    assert row.health == health  # an event without a report keeps the last one
    assert [s for s, _, _ in db.device_history("r1", "d1")] == [
        "received",
        "active",
        "active",
        "committed",
    ]
    # The controller's own marks do not overwrite a step the device already finished.
    assert db.mark_devices("r1", ["d1"], "timeout", 7.0, unless_steps=("committed",)) == 0
    assert db.mark_devices("r1", ["d1"], None, 8.0, column="rollback_at") == 1
    (row,) = db.rollout_devices("r1")
    assert row.step == "committed" and row.rollback_at == 8.0


def test_a_failed_transaction_leaves_nothing_behind(db: FleetDB) -> None:
    with pytest.raises(RuntimeError), db.transaction():
        db.upsert_device("d1", status(), 1.0)
        raise RuntimeError("boom")
    assert db.get_device("d1") is None


def test_concurrent_writers_do_not_interfere(db: FleetDB) -> None:
    def write(n: int) -> None:
        for i in range(20):
            with db.transaction():
                db.upsert_device(f"d{n}-{i}", status(site=str(n)), time.time())

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(db.list_devices()) == 80


def test_urls_and_prefixes_are_checked(tmp_path: Path) -> None:
    assert sqlite_path("sqlite:///rel/fleet.db") == "rel/fleet.db"
    assert sqlite_path("sqlite:////abs/fleet.db") == "/abs/fleet.db"
    assert sqlite_path("sqlite://") == ":memory:"
    with pytest.raises(InvalidInput):
        FleetDB("mysql://nope")
    with pytest.raises(InvalidInput):
        FleetDB(f"sqlite:///{tmp_path}/x.db", prefix="bad; DROP")


def test_fleet_sized_batches_keep_every_device_and_the_order_of_its_reports(
    db: FleetDB,
) -> None:
    """More devices than one statement names (1,200 > 500): every one is written once,
    and of one device's reports in one batch the later one wins."""
    names = [f"d{i:04d}" for i in range(1200)]
    will = DeviceStatus.parse({"kind": "device_status", "online": False})
    batch = [(name, status(site="a"), 1.0) for name in names]
    # d0000 goes offline after its status; d0001 comes back after its will.
    batch += [("d0000", will, 2.0), ("d0001", will, 2.0), ("d0001", status(site="b"), 3.0)]
    db.upsert_devices(batch)
    assert len(db.list_devices({"site": "a"})) == 1199  # the will keeps the labels
    assert [d.device for d in db.list_devices({"site": "b"})] == ["d0001"]
    assert db.online_devices(names) == set(names) - {"d0000"}

    db.create_rollout("r1", "digits", 2, {}, policy(), [(n, 0, 1) for n in names], 1.0)
    assert db.mark_devices("r1", names, "ordered", 2.0, column="ordered_at") == 1200

    def event(step: str, at: float, rollout: str = "r1") -> RolloutEvent:
        return RolloutEvent(rollout_id=rollout, model="digits", version=2, step=step, at=at)

    events = [(n, event("active", 3.0), 3.0) for n in names]
    events += [(n, event("committed", 4.0), 4.0) for n in names[:700]]
    events += [("ghost", event("committed", 4.0), 4.0), (names[0], event("active", 4.0, "r9"), 4.0)]
    assert db.record_events(events) == 2
    rows = {r.device: r for r in db.rollout_devices("r1")}
    assert sum(r.step == "committed" for r in rows.values()) == 700
    assert rows[names[999]].step == "active" and rows[names[999]].active_at == 3.0
    assert [s for s, _, _ in db.device_history("r1", names[0])] == ["active", "committed"]
    # The guard spares the devices that finished: only the 500 still active time out.
    assert db.mark_devices("r1", names, "timeout", 5.0, unless_steps=("committed",)) == 500
    assert len(db.committed_health("r1", 0)) == 0  # committed, but no health reported


def test_of_one_device_s_statuses_in_one_batch_the_last_wins(db: FleetDB) -> None:
    db.upsert_devices([("d1", status(site="a"), 1.0), ("d1", status(site="b"), 2.0)])
    d1 = db.get_device("d1")
    assert d1 is not None and d1.labels == {"site": "b"} and d1.last_seen == 2.0


def test_a_hardware_selector_matches_the_reported_hardware(db: FleetDB) -> None:
    db.upsert_device("jetson", status(site="a"), 1.0)
    other = status(site="a").model_copy(update={"hardware": "cpu"})
    db.upsert_device("pc", other, 1.0)
    assert [d.device for d in db.list_devices({HARDWARE_KEY: "sm_87"})] == ["jetson"]
    assert [d.device for d in db.list_devices({"site": "a", HARDWARE_KEY: "cpu"})] == ["pc"]
    # A label of that name is not the hardware.
    db.upsert_device("liar", status(**{HARDWARE_KEY: "cpu"}), 1.0)
    assert [d.device for d in db.list_devices({HARDWARE_KEY: "cpu"})] == ["pc"]
