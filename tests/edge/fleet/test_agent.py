"""The fleet agent against real Mosquitto, a real HTTP artifact server and ONNX Runtime."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.fleet.agent import FleetAgent
from edge.fleet.health_figures import MetricsHealthSource
from edge.fleet.state import StateStore
from edge.fleet.target import RepositoryTarget
from edge.health import HealthRecorder
from edge.settings import EdgeSettings, load_settings
from edge.shadow import ShadowRates, ShadowSampler
from harness.broker import Broker, free_port
from harness.onnx_models import dense_model
from serving.dataplane import DataPlane
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions
from shared.codec import DecodedRequest
from shared.manifest import generate_key, public_key_text
from tests.edge.fleet.support import (
    ArtifactServer,
    Controller,
    nan_model,
    pack,
    rollback_order,
    signed_order,
    write_repository,
)

X = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_key()


@pytest.fixture(scope="module")
def artifacts() -> Iterator[ArtifactServer]:
    server = ArtifactServer().start()
    yield server
    server.stop()


@pytest.fixture
def controller(broker: Broker, key: Ed25519PrivateKey) -> Iterator[Controller]:
    instance = Controller(broker.url, key)
    yield instance
    instance.stop()


class Device:
    """One simulated device: its own repository, data plane and fleet agent."""

    def __init__(
        self,
        root: Path,
        broker: Broker,
        keys: list[str],
        *,
        device_id: str | None = None,
        fleet: dict[str, Any] | None = None,
        teacher_seed: int | None = None,
    ) -> None:
        self.id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        repo = write_repository(root / "repository", {1: dense_model(seed=1)})
        self.settings: EdgeSettings = load_settings(
            None,
            device_id=self.id,
            data_dir=root / "data",
            repository=repo,
            mqtt_url=broker.url,
            runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
            # Most tests here send no requests: judging on evidence has its own tests.
            fleet={
                "trusted_keys": keys,
                "status_interval_s": 5.0,
                "min_requests": 0,
                # Four threads hammering one model on a loaded 2-core box make the p99 of a
                # 0.3 s window noise (CI once saw an install stop short of "committed", most
                # likely on this gate). The latency gate has its own tests
                # (tests/shared/test_health_gate.py).
                "max_p99_ratio": 1000.0,
                **(fleet or {}),
            },
        )
        self.repository = ModelRepository(
            repo,
            RuntimeOptions(providers=("CPUExecutionProvider",)),
            backend="onnxruntime",
        )
        self.repository.load("dense")
        self.recorder = HealthRecorder()
        self.rates = ShadowRates()
        self.dataplane = DataPlane(self.repository, EdgeMetrics())
        self.dataplane.observers.append(self.recorder)
        self.sampler: ShadowSampler | None = None
        if teacher_seed is not None:
            teacher = ModelRepository(
                write_repository(root / "teacher", {1: dense_model(seed=teacher_seed)}),
                backend="onnxruntime",
            )
            teacher.load("dense")
            self.sampler = ShadowSampler(
                lambda m, inputs: teacher.get(m).predict(inputs), self.recorder, self.rates
            )
            self.sampler.start()
            self.dataplane.observers.append(self.sampler)
        self.agent = self.new_agent()

    def new_agent(self) -> FleetAgent:
        return FleetAgent(
            self.settings,
            RepositoryTarget(self.repository),
            health=self.recorder,
            shadow_rates=self.rates,
        )

    def infer(self) -> tuple[str, np.ndarray]:
        request = DecodedRequest(inputs={"x": X}, datatypes={"x": "FP32"}, outputs=None)
        prediction = self.dataplane.infer("dense", None, request)
        return prediction.model_version, prediction.outputs["y"]

    def served(self) -> list[str]:
        return list(self.repository.served()["dense"])

    def state(self) -> Any:
        return StateStore(self.settings.data_dir / "fleet" / "state.json").load().models["dense"]

    def stop(self) -> None:
        self.agent.stop()
        if self.sampler is not None:
            self.sampler.stop()


@pytest.fixture
def device(tmp_path: Path, broker: Broker, key: Ed25519PrivateKey) -> Iterator[Device]:
    instance = Device(tmp_path, broker, [public_key_text(key)])
    instance.agent.start()
    yield instance
    instance.stop()


def test_install_goes_through_every_step_and_no_request_fails(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    failures: list[str] = []
    answered: set[str] = set()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                answered.add(device.infer()[0])
            except Exception as exc:
                failures.append(repr(exc))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    order = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
    controller.send(device.id, order)
    committed = controller.wait_step(order.rollout_id, "committed")
    stop.set()
    for thread in threads:
        thread.join()

    assert controller.steps(order.rollout_id) == [
        "received", "downloading", "verifying", "staged", "active", "committed",
    ]  # fmt: skip
    assert failures == []
    assert answered == {"1", "2"}
    assert device.served() == ["2"]
    assert committed.health is not None and committed.health.requests > 0
    assert committed.health.errors == 0 and committed.health.p99_ms is not None
    state = device.state()
    assert (state.active, state.previous, state.phase) == (2, 1, "committed")
    model_dir = device.settings.repository / "dense"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "config.json"]
    controller.wait(
        lambda: (
            controller.statuses.get(device.id, {}).get("models", {}).get("dense", {}).get("state")
            == "committed"
        )
    )
    status = controller.statuses[device.id]
    assert status["online"] is True and status["models"]["dense"]["active"] == 2
    assert status["hardware"] == "cpu" and status["agent_version"]

    # The same retained order again (a reconnect) changes nothing.
    controller.send(device.id, order)
    time.sleep(0.3)
    assert controller.steps(order.rollout_id).count("received") == 1


def test_tampered_artifact_fails_and_previous_keeps_serving(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    artifact = pack(dense_model(seed=2), 2)
    order = signed_order(key, artifacts, artifact, version=2, tamper=artifact[:-10] + b"x" * 10)
    controller.send(device.id, order)
    failed = controller.wait_step(order.rollout_id, "failed")
    assert "sha256 mismatch" in failed.reason
    assert device.served() == ["1"] and device.infer()[0] == "1"
    model_dir = device.settings.repository / "dense"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.json"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong key", "untrusted key"),
        ("expired", "manifest expired"),
        ("older", "not newer than the trusted version 1 (rollback attack refused)"),
    ],
)
def test_refused_manifests_are_reported_with_their_reason(
    device: Device,
    controller: Controller,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
    case: str,
    reason: str,
) -> None:
    artifact = pack(dense_model(seed=2), 2)
    if case == "wrong key":
        order = signed_order(generate_key(), artifacts, artifact, version=2)
    elif case == "expired":
        order = signed_order(key, artifacts, artifact, version=2, expires_in_s=-1)
    else:
        order = signed_order(key, artifacts, pack(dense_model(seed=2), 1), version=1)
    controller.send(device.id, order)
    refused = controller.wait_step(order.rollout_id, "refused")
    assert reason in refused.reason
    assert controller.steps(order.rollout_id) == ["received", "refused"]
    assert device.served() == ["1"]


def test_failed_self_test_keeps_serving_the_previous_version(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    order = signed_order(key, artifacts, pack(nan_model(), 2), version=2)
    controller.send(device.id, order)
    failed = controller.wait_step(order.rollout_id, "failed")
    assert "self-test" in failed.reason and "not finite" in failed.reason
    assert device.served() == ["1"] and device.infer()[0] == "1"
    assert not (device.settings.repository / "dense" / "2").exists()
    assert device.state().phase == "failed" and device.state().active in (None, 1)


def test_rollback_order_returns_to_the_previous_version(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    order = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
    controller.send(device.id, order)
    controller.wait_step(order.rollout_id, "committed")
    controller.send(device.id, rollback_order("dense", 1, "rb-1"))
    rolled = controller.wait_step("rb-1", "rolled_back")
    assert rolled.version == 2 and rolled.reason == "rollback ordered"
    assert device.served() == ["1"]
    state = device.state()
    assert (state.active, state.phase) == (1, "rolled_back")
    assert not (device.settings.repository / "dense" / "2").exists()
    # Version 2 was trusted once: the same manifest again is a rollback attack now.
    again = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
    controller.send(device.id, again)
    assert "not newer" in controller.wait_step(again.rollout_id, "refused").reason


def test_rollback_during_the_health_window(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    order = signed_order(
        key, artifacts, pack(dense_model(seed=2), 2), version=2, health_window_s=60
    )
    controller.send(device.id, order)
    controller.wait_step(order.rollout_id, "active")
    assert device.served() == ["2"]
    controller.send(device.id, rollback_order("dense", 1, "rb-2"))
    controller.wait_step("rb-2", "rolled_back")
    assert device.served() == ["1"]
    assert "committed" not in controller.steps(order.rollout_id)


def test_abort_stops_a_download(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    artifacts.delay_s = 0.05
    try:
        big = pack(dense_model(in_features=4, out_features=3, seed=2), 2) + b"\0" * (2 << 20)
        order = signed_order(key, artifacts, big, version=2)
        controller.send(device.id, order)
        controller.wait_step(order.rollout_id, "downloading")
        abort = order.model_copy(update={"action": "abort", "signed_manifest": None})
        controller.send(device.id, abort)
        controller.wait_step(order.rollout_id, "rolled_back")
    finally:
        artifacts.delay_s = 0.0
    assert "failed" in controller.steps(order.rollout_id)
    assert device.served() == ["1"]
    leftovers = [p.name for p in (device.settings.repository / "dense").iterdir()]
    assert sorted(leftovers) == ["1", "config.json"]


def test_an_install_order_arriving_after_its_abort_is_never_started(
    device: Device, controller: Controller, key: Ed25519PrivateKey, artifacts: ArtifactServer
) -> None:
    """A controller's resend of an install can cross the abort on the way: the device ends
    on the abort's answer and downloads nothing."""
    order = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
    abort = order.model_copy(update={"action": "abort", "signed_manifest": None})
    controller.send(device.id, abort)
    controller.wait_step(order.rollout_id, "rolled_back")
    controller.send(device.id, order)
    controller.send(device.id, abort)  # a later order: the device is still answering
    controller.wait(lambda: controller.steps(order.rollout_id).count("rolled_back") >= 2)
    assert controller.steps(order.rollout_id) == ["rolled_back", "rolled_back"]
    assert device.served() == ["1"]
    assert sorted(p.name for p in (device.settings.repository / "dense").iterdir()) == [
        "1",
        "config.json",
    ]


def test_shadow_traffic_measures_agreement_with_the_teacher(
    tmp_path: Path,
    broker: Broker,
    controller: Controller,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
) -> None:
    # Before its switch, each device measures the version it replaces (the baseline the
    # controller compares the agreement with): v1 serves until 8 of its rows are sampled.
    baseline = {"min_baseline_samples": 8}
    # The teacher is the new version's twin: every sampled row agrees.
    agreeing = Device(
        tmp_path / "a", broker, [public_key_text(key)], fleet=baseline, teacher_seed=2
    )
    # This teacher is another model, and the device demands 99% agreement: it rolls back.
    strict = {"min_shadow_agreement": 0.99, **baseline}
    picky = Device(tmp_path / "b", broker, [public_key_text(key)], fleet=strict, teacher_seed=7)
    try:
        for dev in (agreeing, picky):
            dev.agent.start()
            order = signed_order(
                key,
                artifacts,
                pack(dense_model(seed=2), 2),
                version=2,
                shadow_sample_rate=1.0,
                health_window_s=1.0,
                rollout_id=f"shadow-{dev.id}",
            )
            controller.send(dev.id, order)
        rows = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float32)
        for dev in (agreeing, picky):
            controller.wait_step(f"shadow-{dev.id}", "staged")
            # Staged, but held: no baseline samples yet.
            assert "active" not in controller.steps(f"shadow-{dev.id}")
            assert dev.served() == ["1"]
            for row in rows:
                request = DecodedRequest({"x": row[None, :]}, {"x": "FP32"}, None)
                assert dev.dataplane.infer("dense", None, request).model_version == "1"
            assert dev.sampler is not None
            dev.sampler.drain()
        for dev in (agreeing, picky):
            controller.wait_step(f"shadow-{dev.id}", "active")
        for dev in (agreeing, picky):
            for row in rows:
                request = DecodedRequest({"x": row[None, :]}, {"x": "FP32"}, None)
                dev.dataplane.infer("dense", None, request)
            assert dev.sampler is not None
            dev.sampler.drain()
        good = controller.wait_step(f"shadow-{agreeing.id}", "committed")
        assert good.health is not None and good.health.shadow_samples == 8
        assert good.health.shadow_agreement == 1.0
        assert good.health.baseline_shadow_samples == 8
        assert good.health.baseline_shadow_agreement is not None
        bad = controller.wait_step(f"shadow-{picky.id}", "rolled_back")
        assert bad.reason.startswith("unhealthy: shadow agreement")
        assert bad.health is not None and bad.health.shadow_samples == 8
        assert bad.health.baseline_shadow_samples == 8
        assert picky.served() == ["1"]
    finally:
        agreeing.stop()
        picky.stop()


def test_a_version_is_never_healthy_without_evidence(
    tmp_path: Path,
    broker: Broker,
    controller: Controller,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
) -> None:
    """No requests answered, or health figures that cannot be read, are no evidence: the
    window holds until ``evidence_timeout_s`` and then rolls the version back, naming what
    is missing. A device whose requests come after its window commits once they do."""
    keys = [public_key_text(key)]
    need = {"min_requests": 3, "min_shadow_samples": 2}
    idle = Device(tmp_path / "idle", broker, keys, fleet={**need, "evidence_timeout_s": 0.5})
    blind = Device(tmp_path / "blind", broker, keys, fleet={**need, "evidence_timeout_s": 0.5})
    # /metrics of a server that is not there: nothing can be read.
    blind.agent = FleetAgent(
        blind.settings,
        RepositoryTarget(blind.repository),
        health=MetricsHealthSource(f"http://127.0.0.1:{free_port()}/metrics", timeout_s=0.5),
    )
    late = Device(
        tmp_path / "late",
        broker,
        keys,
        # No traffic before the switch here: measuring the baseline has its own test.
        fleet={**need, "evidence_timeout_s": 60, "min_baseline_samples": 0},
        teacher_seed=2,
    )
    devices = (late, idle, blind)
    try:
        for dev in devices:
            dev.agent.start()
            order = signed_order(
                key,
                artifacts,
                pack(dense_model(seed=2), 2),
                version=2,
                health_window_s=0.2,
                shadow_sample_rate=1.0 if dev is late else 0.0,
                rollout_id=f"evidence-{dev.id}",
            )
            controller.send(dev.id, order)
        bad = controller.wait_step(f"evidence-{idle.id}", "rolled_back")
        assert bad.reason.startswith("unhealthy: no evidence: 0 requests recorded"), bad.reason
        assert "min_requests 3" in bad.reason
        assert idle.served() == ["1"]
        unread = controller.wait_step(f"evidence-{blind.id}", "rolled_back")
        assert "no evidence: health figures unavailable" in unread.reason, unread.reason
        assert blind.served() == ["1"]
        # The late device's window ended as long ago as the others': it still holds.
        assert late.state().phase == "active"
        assert "committed" not in controller.steps(f"evidence-{late.id}")
        for _ in range(3):
            assert late.infer()[0] == "2"
        assert late.sampler is not None
        late.sampler.drain()
        good = controller.wait_step(f"evidence-{late.id}", "committed")
        assert good.health is not None and good.health.requests >= 3
        assert good.health.shadow_samples >= 2
    finally:
        for dev in devices:
            dev.stop()


def test_crash_loop_rolls_back_by_itself(
    tmp_path: Path,
    broker: Broker,
    controller: Controller,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
) -> None:
    dev = Device(tmp_path, broker, [public_key_text(key)], fleet={"crash_loop_limit": 2})
    dev.agent.start()
    order = signed_order(
        key, artifacts, pack(dense_model(seed=2), 2), version=2, health_window_s=60
    )
    controller.send(dev.id, order)
    controller.wait_step(order.rollout_id, "active")
    dev.agent.stop()  # the state still says "active, not committed": as after a crash
    for boot in range(1, 4):
        dev.agent = dev.new_agent()
        dev.agent.start()
        assert dev.state().boots == boot or dev.state().phase == "rolled_back"
        if dev.state().phase == "rolled_back":
            break
        dev.agent.stop()
    assert boot == 3
    rolled = controller.wait_step(order.rollout_id, "rolled_back")
    assert rolled.reason.startswith("crash loop")
    assert dev.served() == ["1"]
    dev.stop()


def test_many_devices_share_one_process(
    tmp_path: Path,
    broker: Broker,
    controller: Controller,
    key: Ed25519PrivateKey,
    artifacts: ArtifactServer,
) -> None:
    devices = [Device(tmp_path / str(i), broker, [public_key_text(key)]) for i in range(20)]
    try:
        for dev in devices:
            dev.agent.start()
        order = signed_order(key, artifacts, pack(dense_model(seed=2), 2), version=2)
        for dev in devices:
            controller.send(dev.id, order)
        for dev in devices:
            controller.wait_step(order.rollout_id, "committed", device=dev.id, timeout_s=60)
        assert all(dev.served() == ["2"] for dev in devices)
    finally:
        for dev in devices:
            dev.stop()


def test_ab_split_from_settings_through_the_http_app(tmp_path: Path) -> None:
    from edge.ab import apply_ab_tests
    from edge.agent import EdgeAgent
    from edge.worker import http_app

    repo = write_repository(tmp_path / "repository", {1: dense_model(seed=1)})
    write_repository(repo, {2: dense_model(seed=2)})
    settings = load_settings(
        None,
        repository=repo,
        data_dir=tmp_path / "data",
        runtime={"backend": "onnxruntime", "providers": ["CPUExecutionProvider"]},
        ab={"dense": {"split": {"1": 0.7, "2": 0.3}}},
    )
    agent = EdgeAgent(settings)
    agent.start()
    assert apply_ab_tests(agent.repository, settings.ab) == {}
    client = http_app(agent).test_client()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    versions = []
    for _ in range(300):
        response = client.post("/v2/models/dense/infer", json=body)
        assert response.status_code == 200
        versions.append(response.get_json()["model_version"])
    share = versions.count("2") / len(versions)
    assert set(versions) == {"1", "2"} and 0.18 < share < 0.42
    # Asking for a version by name bypasses the split.
    pinned = client.post("/v2/models/dense/versions/1/infer", json=body).get_json()
    assert pinned["model_version"] == "1"
    metrics = client.get("/metrics").get_data(as_text=True)
    for version in ("1", "2"):
        assert (
            f'tether_requests_total{{model="dense",route="local",served_by="edge",version="{version}"}}'
            in metrics
        )
        assert (
            f'tether_request_duration_seconds_count{{model="dense",version="{version}"}}' in metrics
        )
    agent.close()


def test_a_state_file_naming_paths_is_read_without_them(
    tmp_path: Path, broker: Broker, key: Ed25519PrivateKey
) -> None:
    """A state file written before model names were checked (or by hand) may name
    ``../outside`` or an absolute path with versions to discard and staging to clean:
    recovery must act on none of them."""
    outside = tmp_path / "outside" / "7"
    outside.mkdir(parents=True)
    (outside / "precious.txt").write_text("must survive")
    (tmp_path / "outside" / ".staging-3").mkdir()
    dev = Device(tmp_path, broker, [public_key_text(key)])
    state_file = dev.settings.data_dir / "fleet" / "state.json"
    state_file.parent.mkdir(parents=True, exist_ok=True)
    entry = {"active": 1, "phase": "rolled_back", "discarded": [7], "pending": 3}
    state_file.write_text(
        json.dumps(
            {
                "models": {"../outside": entry, str(tmp_path / "outside"): entry},
                "order_seq": 5,
            }
        )
    )
    dev.agent = dev.new_agent()
    try:
        dev.agent.start()
        assert dev.agent.recovered
        assert set(dev.agent.state.models) == set()
        assert dev.agent.state.order_seq == 5
        assert (outside / "precious.txt").read_text() == "must survive"
        assert (tmp_path / "outside" / ".staging-3").is_dir()
        assert dev.served() == ["1"]
    finally:
        dev.stop()
