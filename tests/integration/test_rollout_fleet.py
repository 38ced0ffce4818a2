"""Staged rollouts end to end: 200 real fleet agents, a real broker, artifact server,
registry, rollout controller and fleet database (SQLite and PostgreSQL).

The fleet (module-scoped, one per database backend) is 200 devices in this process, each
with its own repository folder, data plane, shadow sampler and fleet agent; shadow samples
go through a real uplink to ``digits-teacher`` on a real cloud worker. Each test publishes
a version newer than anything before it and checks where every device ends, so the tests
do not depend on their order. The SIGKILL test adds two devices in processes of their own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.registry import PublishOptions
from cloud.rollout import request_abort, start_rollout
from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.fleet_state import StateStore
from edge.shadow import Teacher, uplink_teacher
from edge.staging import verify_version
from edge.uplink import Uplink
from harness.broker import Broker
from harness.fleet import BACKENDS, open_db
from harness.onnx_models import dense_model
from models.digits import load_split
from serving.settings import RuntimeSettings
from shared.manifest import generate_key, public_key_text
from tests.conftest import REPOSITORY
from tests.edge.fleet_support import write_repository
from tests.edge.test_fleet_crash import DeviceProcess
from tests.integration.fleet_e2e import (
    MODEL,
    TEACHER,
    E2EFleet,
    nan_student,
    permuted_student,
    policy,
    student,
    wait_for,
)

DEVICES = 200
#: Cumulative waves 1, 10 %, 50 %, 100 % of 200 devices.
WAVE_SIZES = [1, 19, 80, 100]


@pytest.fixture(scope="module")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker of this module's own: 200 devices' retained state stays out of other tests."""
    instance = Broker(tmp_path_factory.mktemp("fleet-e2e-mosquitto")).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def teacher(fleet_broker: Broker) -> Iterator[Teacher]:
    """The cloud teacher: a real cloud worker, asked through a real uplink."""
    settings = CloudSettings(
        mqtt_url=fleet_broker.url,
        worker_id=f"e2e-teacher-{uuid.uuid4().hex[:6]}",
        repository=REPOSITORY,
        models=[TEACHER],
        metrics_port=0,
        drain_timeout_s=2.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
    )
    worker = CloudWorker(settings)
    worker.start()
    uplink = Uplink(fleet_broker.url, "e2e-shadow")
    uplink.start()
    yield uplink_teacher(uplink, {MODEL: TEACHER})
    uplink.close()
    worker.stop(drain=False)


@pytest.fixture(scope="module")
def fleet(
    request: pytest.FixtureRequest,
    fleet_broker: Broker,
    teacher: Teacher,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[E2EFleet]:
    backend = request.param
    root = tmp_path_factory.mktemp(f"fleet-e2e-{backend}")
    db = open_db(backend, root)
    pixels = load_split("test")[0][:16]
    instance = E2EFleet(fleet_broker.url, db, root, teacher, pixels)
    try:
        instance.publish(student(), 1)  # the version the devices were provisioned with
        started = time.monotonic()
        instance.add_devices(DEVICES)
        print(f"\n[{backend}] {DEVICES} devices online in {time.monotonic() - started:.1f}s")
        yield instance
    finally:
        instance.close()
        db.drop_schema()
        db.close()


def _ordered(fleet: E2EFleet, rollout_id: str) -> list[str]:
    return [r.device for r in fleet.db.rollout_devices(rollout_id) if r.ordered_at is not None]


def _report(backend: str, scenario: str, seconds: float) -> None:
    print(f"\n[{backend}] {scenario}: {seconds:.2f}s")


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_good_version_rolls_out_wave_by_wave_to_every_device(fleet: E2EFleet) -> None:
    version = fleet.next_version()
    fleet.publish(student(), version)
    before = fleet.versions()
    started = time.monotonic()
    with fleet.traffic() as traffic:
        rid = fleet.start(version, policy())
        assert fleet.wait_final(rid, 150) == "completed", fleet.db.rollout(rid).reason
    _report(fleet.db.dialect.name, "good rollout, 200 devices, 4 waves", time.monotonic() - started)

    rows = fleet.db.rollout_devices(rid)
    assert len(rows) == DEVICES
    assert [sum(1 for r in rows if r.wave == w) for w in range(4)] == WAVE_SIZES
    assert {r.step for r in rows} == {"committed"}
    # Each wave was ordered only once the one before had committed.
    for wave in range(1, 4):
        ordered = min(r.ordered_at or 0 for r in rows if r.wave == wave)
        committed = [
            at
            for r in rows
            if r.wave == wave - 1
            for step, _, at in fleet.db.device_history(rid, r.device)
            if step == "committed"
        ]
        assert ordered >= max(committed) - 0.05
    assert all(v == [version] for v in fleet.versions().values())
    assert all(
        r.previous_version in (None, before[r.device][0]) for r in rows
    )  # None: the operator's version, not yet reported by an agent
    # Real traffic ran through every switch, and none of it failed.
    assert traffic.failures == []
    canary = next(r for r in rows if r.wave == 0)
    assert canary.health is not None and canary.health.requests > 0
    assert canary.health.errors == 0
    # The devices' retained status carried the new version into the fleet table.
    wait_for(
        lambda: all(d.active_version(MODEL) == version for d in fleet.db.list_devices(fleet.sel())),
        10,
        "the fleet table to show the new version",
    )


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_version_failing_its_self_test_stops_at_the_canary(fleet: E2EFleet) -> None:
    version = fleet.next_version()
    fleet.publish(nan_student(), version)
    before = fleet.versions()
    started = time.monotonic()
    with fleet.traffic() as traffic:
        rid = fleet.start(version, policy())
        assert fleet.wait_final(rid, 60) == "rolled_back"
    _report(fleet.db.dialect.name, "bad canary (self-test)", time.monotonic() - started)

    reason = fleet.db.rollout(rid).reason
    assert "wave 1" in reason and "self-test" in reason, reason
    ordered = _ordered(fleet, rid)
    assert len(ordered) == 1  # only the canary ever heard of the bad version
    # The controller does not wait for a device that failed by itself; its confirmation of
    # the rollback order comes on its own time.
    wait_for(
        lambda: fleet.db.device_history(rid, ordered[0])[-1][0] == "rolled_back",
        30,
        "the canary to confirm the rollback",
    )
    history = fleet.db.device_history(rid, ordered[0])
    steps = [step for step, _, _ in history]
    assert "failed" in steps and steps[-1] == "rolled_back", history
    assert any(s == "failed" and "not finite" in r for s, r, _ in history), history
    assert fleet.versions() == before
    assert traffic.failures == []
    assert all(str(version) not in d.version_dirs() for d in fleet.devices)


@pytest.mark.parametrize("fleet", BACKENDS, indirect=True)
def test_version_disagreeing_with_the_teacher_stops_at_the_canary(fleet: E2EFleet) -> None:
    version = fleet.next_version()
    fleet.publish(permuted_student(), version)
    fleet.measure_baseline()
    before = fleet.versions()
    started = time.monotonic()
    with fleet.traffic() as traffic, fleet.evidence(min_shadow_samples=1):
        # However slow the first shadow samples are on a loaded machine, the canary's
        # window lasts until it has them, and the gate judges on them (docs/rollouts.md).
        rid = fleet.start(
            version, policy(shadow_sample_rate=1.0, min_shadow_samples=1, min_baseline_samples=1)
        )
        assert fleet.wait_final(rid, 60) == "rolled_back"
    _report(fleet.db.dialect.name, "bad canary (shadow agreement)", time.monotonic() - started)

    reason = fleet.db.rollout(rid).reason
    assert "wave 1" in reason and "shadow agreement" in reason, reason
    # Compared with the canary's measured baseline (min_baseline_samples 1), not skipped.
    assert "fell to" in reason and "no evidence" not in reason, reason
    ordered = _ordered(fleet, rid)
    assert len(ordered) == 1
    steps = [step for step, _, _ in fleet.db.device_history(rid, ordered[0])]
    # The canary's own checks passed (it loads and answers); the cloud's gate did not.
    assert steps[-2:] == ["committed", "rolled_back"], steps
    row = next(r for r in fleet.db.rollout_devices(rid) if r.device == ordered[0])
    assert row.health is not None and row.health.shadow_samples > 0
    assert (row.health.shadow_agreement or 0.0) < 0.5
    assert fleet.versions() == before
    assert traffic.failures == []


@pytest.mark.parametrize("fleet", ["sqlite"], indirect=True)
def test_abort_in_the_middle_of_a_wave_rolls_every_updated_device_back(fleet: E2EFleet) -> None:
    version = fleet.next_version()
    fleet.publish(student(), version)
    before = fleet.versions()
    with fleet.traffic() as traffic:
        # A health window long enough that the abort lands while the third wave is still in
        # it, even when a loaded machine is slow to pass the abort on.
        rid = fleet.start(version, policy(window_s=4.0))

        def third_wave_under_way() -> bool:
            rows = fleet.db.rollout_devices(rid)
            return sum(1 for r in rows if r.wave == 2 and r.step == "active") >= 10

        wait_for(third_wave_under_way, 60, "the third wave to be half-way")
        assert request_abort(fleet.db, rid)
        started = time.monotonic()
        assert fleet.wait_final(rid, 60) == "rolled_back"
    _report("sqlite", "abort mid-wave -> all rolled back", time.monotonic() - started)

    assert fleet.db.rollout(rid).reason == "aborted by operator"
    ordered = _ordered(fleet, rid)
    assert len(ordered) == WAVE_SIZES[0] + WAVE_SIZES[1] + WAVE_SIZES[2]
    for device in ordered:
        assert fleet.db.device_history(rid, device)[-1][0] == "rolled_back", device
    assert fleet.versions() == before
    assert traffic.failures == []
    assert all(str(version) not in d.version_dirs() for d in fleet.devices)


@pytest.mark.parametrize("fleet", ["sqlite"], indirect=True)
def test_bad_manifests_and_artifacts_are_refused_with_the_reason(fleet: E2EFleet) -> None:
    cases: list[tuple[str, str, str, str]] = []  # (group, rollout id, step, reason wanted)

    # A tampered artifact: the bytes on the artifact server are not the ones signed.
    version = fleet.next_version()
    signed = fleet.publish(student(), version)
    path = fleet.store.path_of(signed.manifest.sha256)
    data = bytearray(path.read_bytes())
    data[-600] ^= 0xFF
    path.write_bytes(bytes(data))
    cases.append(("g1", fleet.start(version, policy(), group="g1"), "failed", "sha256 mismatch"))

    # A manifest signed by a key the devices do not trust.
    version = fleet.next_version()
    fleet.publish(student(), version, key=generate_key())
    cases.append(("g2", fleet.start(version, policy(), group="g2"), "refused", "untrusted key"))

    # An expired manifest.
    version = fleet.next_version()
    fleet.publish(
        student(), version, options=PublishOptions(expires_s=60.0), now=time.time() - 3600
    )
    cases.append(("g3", fleet.start(version, policy(), group="g3"), "refused", "expired"))

    # An older signed manifest replayed to devices on a newer version. start_rollout never
    # selects them for it, so the rollout row is written the way a stale or compromised
    # controller database would hold it.
    version = fleet.next_version()
    fleet.publish(student(), version)
    good = fleet.start(version, policy(waves=["100%"]), group="g4")
    assert fleet.wait_final(good, 60) == "completed"
    group = fleet.group("g4")
    old, _ = fleet.db.create_rollout(
        f"{MODEL}-v1-replay-{uuid.uuid4().hex[:6]}",
        MODEL,
        1,
        fleet.sel(group="g4", replay="yes"),
        policy(),
        [(d.name, 0 if i == 0 else 1, version) for i, d in enumerate(group)],
        time.time(),
    )
    cases.append(("g4", old.id, "refused", "not newer than the trusted version"))

    before = fleet.versions()
    started = time.monotonic()
    with fleet.traffic() as traffic:
        for _, rid, _, _ in cases:
            assert fleet.wait_final(rid, 60) == "rolled_back", rid
    _report("sqlite", "four refusals, each stopped at its canary", time.monotonic() - started)

    for group_name, rid, step, wanted in cases:
        reason = fleet.db.rollout(rid).reason
        assert "wave 1" in reason and wanted in reason, (group_name, reason)
        ordered = _ordered(fleet, rid)
        assert len(ordered) == 1, (group_name, ordered)
        wait_for(  # not waited for by the controller (it refused): confirms on its own time
            lambda rid=rid, device=ordered[0]: (
                fleet.db.device_history(rid, device)[-1][0] == "rolled_back"
            ),
            30,
            f"{group_name}: the canary to confirm the rollback",
        )
        history = fleet.db.device_history(rid, ordered[0])
        assert any(s == step and wanted in r for s, r, _ in history), (group_name, history)
        assert history[-1][0] == "rolled_back", (group_name, history)
    assert fleet.versions() == before
    assert traffic.failures == []


@pytest.mark.parametrize("fleet", ["sqlite"], indirect=True)
def test_agent_killed_during_the_switch_comes_back_serving_a_complete_version(
    fleet: E2EFleet,
    fleet_broker: Broker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    publish_root = write_repository(tmp_path / "publish", {2: dense_model(seed=2)})
    signed = fleet.registry.publish(publish_root / "dense" / "2", fleet.key)
    public = public_key_text(fleet.key)
    monkeypatch.setenv("TETHER_FLEET__LABELS", json.dumps({"run": fleet.run, "kind": "crash"}))
    names = [f"e2e{fleet.run}-crash-{i}" for i in range(2)]
    roots = {name: tmp_path / name for name in names}
    for root in roots.values():
        write_repository(root / "repository", {1: dense_model(seed=1)})
    first = {
        name: DeviceProcess(roots[name], fleet_broker, public, name, "switching") for name in names
    }
    second: dict[str, DeviceProcess] = {}
    try:
        for process in first.values():
            process.wait_for("serving", 1)
        wait_for(
            lambda: (
                set(names) <= {d.device for d in fleet.db.list_devices(fleet.sel()) if d.online}
            ),
            30,
            "the crash devices to be online",
        )
        rollout, _ = start_rollout(
            fleet.db,
            "dense",
            2,
            fleet.sel(kind="crash"),
            policy(waves=["100%"], window_s=0.5, device_timeout_s=60.0),
        )
        for process in first.values():
            process.wait_for("step", "switching")
            process.kill()  # SIGKILL between the saved state and the switch
        started = time.monotonic()
        wait_for(
            lambda: not any(d.online for d in fleet.db.list_devices(fleet.sel(kind="crash"))),
            10,
            "the last wills to mark the devices offline",
        )
        for name in names:
            second[name] = DeviceProcess(roots[name], fleet_broker, public, name, None)
        for name, process in second.items():
            served = process.wait_for("serving")["serving"]
            assert served in (1, 2)  # it answered a request: a complete version loaded
            assert verify_version(roots[name] / "repository" / "dense" / str(served)) in (
                None,
                "no verification marker",
            )
        assert fleet.wait_final(rollout.id, 60) == "completed", fleet.db.rollout(rollout.id).reason
        _report(
            "sqlite", "SIGKILL during switch -> restart -> committed", time.monotonic() - started
        )
    finally:
        for process in (*first.values(), *second.values()):
            if process.process.poll() is None:
                process.kill()

    assert {r.step for r in fleet.db.rollout_devices(rollout.id)} == {"committed"}
    for name in names:
        state = StateStore(roots[name] / "data" / "fleet" / "state.json").load().models["dense"]
        assert (state.active, state.previous, state.phase, state.pending) == (
            2,
            1,
            "committed",
            None,
        )
        model_dir = roots[name] / "repository" / "dense"
        assert verify_version(model_dir / "2", signed.manifest.sha256) is None
        assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.json"]
