"""A fleet for tests: database, artifact server, registry, controller and simulated devices."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import Registry
from cloud.rollout import RolloutController
from cloud.rollout_policy import RolloutPolicy
from harness.fleet_sim import Behaviour, SimDevice
from shared.errors import Unavailable
from shared.manifest import SignedManifest, generate_key
from shared.mqtt import MqttClient

#: The PostgreSQL the tests use (CI runs it too); unreachable is a failure, not a skip.
POSTGRES_URL = os.environ.get(
    "TETHER_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
BACKENDS = ["sqlite", "postgresql"]


def open_db(backend: str, tmp_path: Path) -> FleetDB:
    """A fresh fleet database with its own table prefix (drop it with ``drop_schema``)."""
    prefix = f"t{uuid.uuid4().hex[:12]}_"
    if backend == "sqlite":
        return FleetDB(f"sqlite:///{tmp_path}/fleet.db", prefix=prefix)
    try:
        return FleetDB(POSTGRES_URL, prefix=prefix)
    except Unavailable as exc:
        pytest.fail(
            f"PostgreSQL is required for the fleet tests and is unreachable: {exc.message}. "
            "Start it or set TETHER_TEST_POSTGRES_URL."
        )


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


def make_version(root: Path, model: str, version: int, size: int = 32 * 1024) -> Path:
    """A model repository version folder with a config and a (random) model file."""
    folder = root / model / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    (root / model / "config.json").write_text(json.dumps({"name": model, "platform": "onnx"}))
    (folder / "model.onnx").write_bytes(os.urandom(size))
    return folder


class FleetHarness:
    """Everything the cloud side runs, plus simulated devices, on a real broker."""

    def __init__(
        self, broker_url: str, db: FleetDB, tmp_path: Path, *, tick_s: float = 0.02
    ) -> None:
        self.broker_url = broker_url
        self.db = db
        self.tmp_path = tmp_path
        self.key = generate_key()
        self.store = ArtifactStore(tmp_path / "artifacts")
        self.server = ArtifactServer(self.store).start()
        self.registry = Registry(db, self.store, self.server.url)
        self.run = uuid.uuid4().hex[:6]
        self.mqtt = MqttClient(broker_url, f"fleet-test-{self.run}")
        self.mqtt.start()
        self.controller = RolloutController(db, self.mqtt, signing_key=self.key, tick_s=tick_s)
        self.controller.start()
        self.executor = ThreadPoolExecutor(max_workers=64)
        self.devices: list[SimDevice] = []

    def publish(self, model: str, version: int) -> SignedManifest:
        return self.registry.publish(make_version(self.tmp_path / "repo", model, version), self.key)

    def add_devices(
        self,
        count: int,
        *,
        labels: dict[str, str] | None = None,
        models: dict[str, int] | None = None,
        behaviour: Callable[[int], Behaviour] | None = None,
    ) -> list[SimDevice]:
        """Start ``count`` devices and wait until the database knows all of them."""
        new = [
            SimDevice(
                name=f"d{self.run}-{len(self.devices) + i:04d}",
                broker_url=self.broker_url,
                trusted_keys=[self.key.public_key()],
                executor=self.executor,
                labels={"run": self.run, **(labels or {"site": "lab"})},
                models=dict(models or {"digits": 1}),
                behaviour=behaviour(i) if behaviour else Behaviour(),
            )
            for i in range(count)
        ]
        for device in new:
            device.start(wait_s=None)
        for device in new:
            assert device.mqtt.wait_connected(20), device.name
            device.announce()
        self.devices += new
        names = {d.name for d in new}
        wait_for(
            lambda: names <= {d.device for d in self.db.list_devices()},
            20,
            "device statuses to reach the database",
        )
        return new

    def sel(self, **labels: str) -> dict[str, str]:
        """A selector for this harness's devices (other tests' retained statuses differ)."""
        return {"run": self.run, **labels}

    def device(self, name: str) -> SimDevice:
        return next(d for d in self.devices if d.name == name)

    def wait_state(self, rollout_id: str, states: set[str], timeout_s: float = 20.0) -> str:
        wait_for(
            lambda: self.db.rollout(rollout_id).state in states,
            timeout_s,
            f"rollout {rollout_id} to reach {states}",
        )
        return self.db.rollout(rollout_id).state

    def close(self) -> None:
        self.controller.stop()
        for device in self.devices:
            device.stop()
        self.mqtt.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.server.stop()


def policy(**overrides: object) -> RolloutPolicy:
    """A fast test policy: 0.2 s windows, 3 s device timeout."""
    values: dict[str, object] = {
        "waves": ["1", "10%", "50%", "100%"],
        "window_s": 0.2,
        "max_failure": "5%",
        "device_timeout_s": 3.0,
        "shadow_sample_rate": 0.1,
    }
    values.update(overrides)
    return RolloutPolicy(**values)  # type: ignore[arg-type]
