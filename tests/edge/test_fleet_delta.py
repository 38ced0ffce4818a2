"""Delta downloads end to end: the real registry makes signed deltas at publish, the real
fleet agent installs from them byte for byte, and falls back to the full artifact when a
delta is corrupted. Real Mosquitto, HTTP artifact server and ONNX Runtime."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import Registry
from edge.fleet_agent import FleetAgent
from edge.fleet_target import RepositoryTarget
from edge.settings import load_settings
from harness.broker import Broker
from harness.onnx_models import headed_classifier
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions
from shared.fleet import RolloutOrder
from shared.manifest import SignedManifest, generate_key, public_key_text
from tests.edge.fleet_support import DENSE_CONFIG, Controller


def write_version(root: Path, version: int, head_seed: int) -> Path:
    folder = root / "dense" / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(headed_classifier(head_seed, width=256), folder / "model.onnx")
    (root / "dense" / "config.json").write_text(json.dumps(DENSE_CONFIG))
    return folder


class Cloud:
    """The real registry and artifact server over a fleet database."""

    def __init__(self, tmp: Path) -> None:
        self.key = generate_key()
        self.db = FleetDB(f"sqlite:///{tmp}/fleet.db")
        self.store = ArtifactStore(tmp / "artifacts")
        self.server = ArtifactServer(self.store).start()
        self.registry = Registry(self.db, self.store, self.server.url)
        self.sources = tmp / "published"

    def publish(self, version: int, head_seed: int) -> SignedManifest:
        return self.registry.publish(write_version(self.sources, version, head_seed), self.key)

    def close(self) -> None:
        self.server.stop()
        self.db.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    instance = Cloud(tmp_path / "cloud")
    yield instance
    instance.close()


@pytest.fixture
def agent(tmp_path: Path, broker: Broker, cloud: Cloud) -> Iterator[FleetAgent]:
    repo = tmp_path / "device" / "repository"
    write_version(repo, 1, head_seed=1)
    settings = load_settings(
        None,
        device_id=f"delta-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "device" / "data",
        repository=repo,
        mqtt_url=broker.url,
        runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        fleet={
            "trusted_keys": [public_key_text(cloud.key)],
            "status_interval_s": 5.0,
            "min_requests": 0,  # no traffic here
        },
    )
    repository = ModelRepository(
        repo, RuntimeOptions(providers=("CPUExecutionProvider",)), backend="onnxruntime"
    )
    repository.load("dense")
    instance = FleetAgent(settings, RepositoryTarget(repository))
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def controller(broker: Broker, cloud: Cloud) -> Iterator[Controller]:
    instance = Controller(broker.url, cloud.key)
    yield instance
    instance.stop()


def install(controller: Controller, agent: FleetAgent, signed: SignedManifest) -> tuple[int, int]:
    """Order ``signed`` installed; ``(bytes downloaded, delta base or 0)`` once committed."""
    order = RolloutOrder(
        rollout_id=f"r-{uuid.uuid4().hex[:8]}",
        action="install",
        model="dense",
        signed_manifest=signed,
        health_window_s=0.2,
        issued_at=time.time(),
    )
    controller.send(agent.device, order)
    staged = controller.wait_step(order.rollout_id, "staged", timeout_s=60)
    controller.wait_step(order.rollout_id, "committed", timeout_s=60)
    assert staged.bytes_downloaded is not None
    return staged.bytes_downloaded, staged.delta_from or 0


def installed_bytes(agent: FleetAgent, version: int) -> bytes:
    return (agent.root / "dense" / str(version) / "model.onnx").read_bytes()


def test_a_new_head_installs_from_a_small_delta_byte_for_byte(
    cloud: Cloud, agent: FleetAgent, controller: Controller
) -> None:
    first = cloud.publish(2, head_seed=2)
    assert first.manifest.deltas is None  # nothing earlier was published
    assert install(controller, agent, first) == (first.manifest.size, 0)

    second = cloud.publish(3, head_seed=3)
    deltas = second.manifest.deltas or []
    assert [d.from_version for d in deltas] == [2]
    assert deltas[0].size < second.manifest.size / 10  # only the head changed
    downloaded, base = install(controller, agent, second)
    assert (downloaded, base) == (deltas[0].size, 2)
    source = cloud.sources / "dense" / "3" / "model.onnx"
    assert installed_bytes(agent, 3) == source.read_bytes()
    assert agent.target.current("dense") == 3


def test_a_corrupted_delta_falls_back_to_the_full_artifact(
    cloud: Cloud, agent: FleetAgent, controller: Controller
) -> None:
    install(controller, agent, cloud.publish(2, head_seed=2))
    signed = cloud.publish(3, head_seed=3)
    delta = (signed.manifest.deltas or [])[0]
    path = cloud.store.path_of(delta.sha256)
    path.write_bytes(b"\x00" * delta.size)  # same size, wrong bytes: the sha256 catches it
    downloaded, base = install(controller, agent, signed)
    assert (downloaded, base) == (signed.manifest.size, 0)
    source = cloud.sources / "dense" / "3" / "model.onnx"
    assert installed_bytes(agent, 3) == source.read_bytes()
