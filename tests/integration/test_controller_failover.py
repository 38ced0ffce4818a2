"""Two rollout controllers on one PostgreSQL database: the leader is SIGKILLed mid-wave and
the other one finishes the rollout. Real Mosquitto, PostgreSQL, artifact server, registry
and controller processes; simulated devices (harness/fleet_sim.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.leadership import LEASE
from cloud.registry import Registry
from cloud.rollout import start_rollout
from harness.broker import Broker
from harness.fleet import POSTGRES_URL, make_version, open_db, policy, wait_for
from harness.fleet_sim import SimDevice
from shared.manifest import generate_key, save_private_key

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 20
#: The lease's lifetime: the longest a dead leader can hold the rollouts up.
TTL_S = 2.0


class ControllerProcess:
    """``tests.cloud.controller_process`` in a subprocess."""

    def __init__(self, broker: Broker, prefix: str, holder: str, log: Path, key: Path) -> None:
        self.holder = holder
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.cloud.controller_process",
                broker.url,
                POSTGRES_URL,
                prefix,
                holder,
                str(TTL_S),
                str(key),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready", log.read_text()[-2000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    instance = Broker(tmp_path / "broker").start()
    yield instance
    instance.stop()


def test_a_killed_leader_hands_the_rollout_over_without_a_lost_or_twice_opened_wave(
    tmp_path: Path, fleet_broker: Broker
) -> None:
    db = open_db("postgresql", tmp_path)
    key = generate_key()
    save_private_key(key, tmp_path / "signing.pem")
    store = ArtifactStore(tmp_path / "artifacts")
    server = ArtifactServer(store).start()
    registry = Registry(db, store, server.url)
    executor = ThreadPoolExecutor(max_workers=16)
    devices = [
        SimDevice(
            name=f"ha-{i:02d}-{db.prefix[:8]}",
            broker_url=fleet_broker.url,
            trusted_keys=[key.public_key()],
            executor=executor,
            labels={"ha": db.prefix},
            models={"digits": 1},
        )
        for i in range(DEVICES)
    ]
    controllers: list[ControllerProcess] = []
    try:
        for device in devices:
            device.start()
            device.announce()
        controllers = [
            ControllerProcess(
                fleet_broker, db.prefix, name, tmp_path / f"{name}.log", tmp_path / "signing.pem"
            )
            for name in ("alpha", "beta")
        ]
        wait_for(lambda: len(db.list_devices({"ha": db.prefix})) == DEVICES, 30, "statuses")
        wait_for(lambda: db.lease(LEASE) is not None, 30, "a leader")
        registry.publish(make_version(tmp_path / "repo", "digits", 2), key)
        rollout, _ = start_rollout(
            db,
            "digits",
            2,
            {"ha": db.prefix},
            policy(waves=["1", "10%", "50%", "100%"], window_s=1.0, device_timeout_s=30),
        )
        # Mid-wave: the second wave is ordered and its health window is running.
        wait_for(lambda: db.rollout(rollout.id).wave >= 1, 60, "the second wave")
        lease = db.lease(LEASE)
        assert lease is not None
        leader = next(c for c in controllers if c.holder == lease[0])
        killed_at = time.monotonic()
        leader.kill()
        wait_for(
            lambda: (now := db.lease(LEASE)) is not None and now[0] != leader.holder,
            TTL_S + 15,
            "the other controller to take the lease",
        )
        handover_s = time.monotonic() - killed_at
        wait_for(
            lambda: db.rollout(rollout.id).state in ("completed", "rolled_back"),
            90,
            "the rollout to finish under the new leader",
        )
        record = db.rollout(rollout.id)
        log = db.wave_log(rollout.id)
    finally:
        for controller in controllers:
            controller.stop()
        for device in devices:
            device.stop()
        executor.shutdown(wait=False, cancel_futures=True)
        server.stop()
        db.drop_schema()
        db.close()
    assert record.state == "completed", record.reason
    assert handover_s < TTL_S + 15
    assert all(device.models == {"digits": 2} for device in devices)
    # Every device installed once: no order was lost, none acted on twice.
    assert all(device.steps.count(("active", "")) == 1 for device in devices)
    assert all(device.gate.refused == [] for device in devices)  # every order was signed
    assert [wave for wave, _, _, _ in log] == [0, 1, 2, 3]  # each wave opened exactly once
    holders = {holder for _, holder, _, _ in log}
    survivor = next(c.holder for c in controllers if c.holder != leader.holder)
    assert leader.holder in holders and survivor in holders
    epochs = [epoch for _, _, epoch, _ in log]
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0]
