"""An end-to-end fleet for tests: the real cloud side and hundreds of real fleet agents.

Everything here is the production code, wired in one process the way ``tether fleet serve``
and ``tether edge`` wire it: a real Mosquitto (the ``broker`` fixture), the artifact store
and its HTTP server (:mod:`cloud.artifacts`), the registry that packs and signs
(:mod:`cloud.registry`), the fleet database (SQLite or PostgreSQL, :mod:`cloud.fleet_db`)
and the rollout controller (:mod:`cloud.rollout`). Each :class:`E2EDevice` is one device:
its own repository folder (``digits-student`` v1 copied from ``models/repository``), its own
:class:`~serving.repository.ModelRepository`, :class:`~serving.dataplane.DataPlane` with the
health recorder and shadow sampler as observers, and its own
:class:`~edge.fleet.agent.FleetAgent` with one MQTT connection. Shadow samples go to the
cloud teacher (``digits-teacher`` on a real :class:`~cloud.worker.CloudWorker`) through a
real :class:`~edge.uplink.Uplink`, shared by the devices of the process.

:class:`Traffic` sends real requests (test-split pixels) through the devices' data planes,
mostly to the devices inside a health window, and records every failure: a rollout must
never fail a request.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from cloud.artifacts import ArtifactServer, ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import PublishOptions, Registry
from cloud.rollout import RolloutController, start_rollout
from cloud.rollout_policy import RolloutPolicy
from edge.fleet.agent import FleetAgent
from edge.fleet.target import RepositoryTarget
from edge.health import HealthRecorder
from edge.settings import load_settings
from edge.shadow import ShadowRates, ShadowSampler, Teacher
from serving.dataplane import DataPlane
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from serving.runtimes import RuntimeOptions
from shared.codec import DecodedRequest
from shared.manifest import SignedManifest, generate_key, public_key_text
from shared.mqtt import MqttClient
from tests.conftest import REPOSITORY

MODEL = "digits-student"
TEACHER = "digits-teacher"
CPU = ("CPUExecutionProvider",)
#: The v1 every device starts with (operator-provisioned, no rollout marker).
STUDENT_V1 = REPOSITORY / MODEL / "1" / "model.onnx"


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.02)


# ---------------------------------------------------------------------------- models


def student() -> onnx.ModelProto:
    """The distilled student as shipped (a good new version is a byte-identical copy)."""
    return onnx.load(STUDENT_V1)


def permuted_student(shift: int = 3) -> onnx.ModelProto:
    """The student with its output classes rotated: loads, runs, finite, and wrong.

    Its self-test passes; only shadow agreement with the teacher can tell it apart.
    """
    model = onnx.load(STUDENT_V1)
    graph = model.graph
    output = graph.output[0].name
    raw = f"{output}_unpermuted"
    for node in graph.node:
        node.output[:] = [raw if name == output else name for name in node.output]
    order = np.roll(np.arange(10, dtype=np.int64), shift)
    graph.initializer.append(numpy_helper.from_array(order, "class_order"))
    graph.node.append(helper.make_node("Gather", [raw, "class_order"], [output], axis=1))
    onnx.checker.check_model(model)
    return model


def nan_student() -> onnx.ModelProto:
    """A model with the student's signature whose every output is NaN (fails the self-test)."""
    nodes = [
        helper.make_node("MatMul", ["pixels", "W"], ["h"]),
        helper.make_node("Sub", ["h", "one"], ["negative"]),
        helper.make_node("Sqrt", ["negative"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan-student",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializer=[
            numpy_helper.from_array(np.zeros((64, 10), dtype=np.float32), "W"),
            numpy_helper.from_array(np.ones((10,), dtype=np.float32), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------- devices


class E2EDevice:
    """One simulated device running the real fleet agent on its own repository folder."""

    def __init__(
        self,
        name: str,
        root: Path,
        broker_url: str,
        trusted_keys: list[str],
        labels: dict[str, str],
        teacher: Teacher,
    ) -> None:
        self.name = name
        repo = root / "repository"
        (repo / MODEL / "1").mkdir(parents=True)
        shutil.copy(REPOSITORY / MODEL / "config.json", repo / MODEL / "config.json")
        shutil.copy(STUDENT_V1, repo / MODEL / "1" / "model.onnx")
        self.settings = load_settings(
            None,
            device_id=name,
            data_dir=root / "data",
            repository=repo,
            mqtt_url=broker_url,
            runtime={"backend": "onnxruntime", "providers": list(CPU)},
            fleet={
                "trusted_keys": trusted_keys,
                "labels": labels,
                "status_interval_s": 60.0,
                # Latency on a shared 2-core box running 200 devices is noise; the p99
                # checks are covered with controlled figures in tests/cloud/test_rollout.py.
                "max_p99_ratio": 1000.0,
                # One traffic thread cannot give 200 devices installing at once their own
                # evidence in time: windows are judged on what arrived, as before, unless a
                # test asks for evidence (E2EFleet.evidence). Waiting for evidence is tested
                # with controlled devices (tests/edge/fleet/test_agent.py).
                "min_requests": 0,
                "min_shadow_samples": 0,
                # Nor can it give each device a baseline before its switch: tests that
                # check agreement measure it first (E2EFleet.measure_baseline).
                "min_baseline_samples": 0,
            },
        )
        self.repository = ModelRepository(
            repo, RuntimeOptions(providers=CPU), backend="onnxruntime"
        )
        self.repository.load(MODEL)
        self.recorder = HealthRecorder()
        self.rates = ShadowRates()
        self.sampler = ShadowSampler(teacher, self.recorder, self.rates, max_queue=16, seed=0)
        self.dataplane = DataPlane(self.repository, EdgeMetrics())
        self.dataplane.observers += [self.recorder, self.sampler]
        self.agent = FleetAgent(
            self.settings,
            RepositoryTarget(self.repository),
            health=self.recorder,
            shadow_rates=self.rates,
        )

    def start(self) -> None:
        self.sampler.start()
        self.agent.start(connect_wait_s=None)

    def stop(self) -> None:
        self.agent.stop()
        self.sampler.stop()

    def infer(self, pixels: np.ndarray) -> str:
        """One request through the data plane; returns the version that answered."""
        request = DecodedRequest(inputs={"pixels": pixels}, datatypes={"pixels": "FP32"})
        return self.dataplane.infer(MODEL, None, request).model_version

    def has_baseline(self) -> bool:
        """Whether every version served now has shadow samples (agreement with the teacher)."""
        return all(
            self.recorder.counters(MODEL, str(version)).shadow_samples > 0
            for version in self.served()
        )

    def served(self) -> list[int]:
        """The versions the repository serves now."""
        return sorted(int(v) for v in self.repository.served().get(MODEL, {}))

    def in_window(self) -> bool:
        """Whether a freshly switched version is inside its health window."""
        st = self.agent.state.models.get(MODEL)
        return st is not None and st.phase == "active"

    def version_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.settings.repository / MODEL).iterdir())


class Traffic:
    """Real requests through the devices' data planes, while a rollout runs.

    Every pass sends one request to each device inside a health window and to a few of
    the others in turn. The same rows every time, so two versions with the same weights
    agree with the teacher on exactly the same share of rows.
    """

    def __init__(self, devices: list[E2EDevice], pixels: np.ndarray, *, cold_per_pass: int = 4):
        self.devices = devices
        self.pixels = pixels
        self.cold_per_pass = cold_per_pass
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, name="e2e-traffic", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            hot = [d for d in self.devices if d.in_window()]
            cold = [self.devices[(turn + i) % len(self.devices)] for i in range(self.cold_per_pass)]
            turn += self.cold_per_pass
            for device in (*hot, *cold):
                try:
                    device.infer(self.pixels)
                    self.sent += 1
                except Exception as exc:
                    self.failures.append(f"{device.name}: {exc!r}")
            time.sleep(0.005)


# ---------------------------------------------------------------------------- the fleet


class E2EFleet:
    """The cloud side (registry, artifact server, database, controller) plus devices."""

    def __init__(
        self, broker_url: str, db: FleetDB, root: Path, teacher: Teacher, pixels: np.ndarray
    ) -> None:
        self.broker_url = broker_url
        self.db = db
        self.root = root
        self.teacher = teacher
        self.pixels = pixels
        self.key = generate_key()
        self.store = ArtifactStore(root / "artifacts")
        self.server = ArtifactServer(self.store).start()
        self.registry = Registry(db, self.store, self.server.url)
        self.run = uuid.uuid4().hex[:6]
        self.mqtt = MqttClient(broker_url, f"tether-e2e-fleet-{self.run}")
        self.mqtt.start()
        self.controller = RolloutController(db, self.mqtt, signing_key=self.key, tick_s=0.05)
        self.controller.start()
        self.devices: list[E2EDevice] = []

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        model: onnx.ModelProto,
        version: int,
        *,
        key: Ed25519PrivateKey | None = None,
        options: PublishOptions | None = None,
        now: float | None = None,
    ) -> SignedManifest:
        """Publish ``model`` as ``digits-student/<version>`` through the real registry."""
        folder = self.root / "publish" / MODEL / str(version)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPOSITORY / MODEL / "config.json", folder.parent / "config.json")
        onnx.save(model, folder / "model.onnx")
        return self.registry.publish(folder, key or self.key, options, now=now)

    def next_version(self) -> int:
        latest = self.db.latest_manifest(MODEL)
        return latest.manifest.version + 1 if latest is not None else 2

    # ------------------------------------------------------------------ devices

    def add_devices(self, count: int, groups: int = 10) -> list[E2EDevice]:
        """Start ``count`` devices and wait until the fleet database knows all of them."""
        public = public_key_text(self.key)
        new = []
        for i in range(len(self.devices), len(self.devices) + count):
            name = f"e2e{self.run}-{i:04d}"
            labels = {"run": self.run, "group": f"g{i % groups}"}
            new.append(
                E2EDevice(
                    name,
                    self.root / "devices" / name,
                    self.broker_url,
                    [public],
                    labels,
                    self.teacher,
                )
            )
        for device in new:
            device.start()
        self.devices += new
        names = {d.name for d in new}

        def online() -> set[str]:
            return {d.device for d in self.db.list_devices({"run": self.run}) if d.online}

        deadline = time.monotonic() + 60
        while not names <= (seen := online()):
            if time.monotonic() > deadline:
                missing = sorted(names - seen)
                known = {d.device: d.online for d in self.db.list_devices({"run": self.run})}
                connected = {d.name: d.agent.client.connected for d in new}
                raise AssertionError(
                    f"{len(missing)} of {len(names)} devices' statuses never reached the "
                    f"fleet database as online, e.g. "
                    + ", ".join(
                        f"{m} (in the database: {known.get(m)}, connected: {connected[m]})"
                        for m in missing[:5]
                    )
                )
            time.sleep(0.2)  # each look reads every device: leave the intake the database
        return new

    def sel(self, **labels: str) -> dict[str, str]:
        return {"run": self.run, **labels}

    def group(self, name: str) -> list[E2EDevice]:
        return [d for d in self.devices if d.settings.fleet.labels.get("group") == name]

    def versions(self, devices: Iterable[E2EDevice] | None = None) -> dict[str, list[int]]:
        """device -> versions served now."""
        return {d.name: d.served() for d in (self.devices if devices is None else devices)}

    def traffic(self, devices: list[E2EDevice] | None = None) -> Traffic:
        return Traffic(self.devices if devices is None else devices, self.pixels)

    def measure_baseline(self, rate: float = 1.0) -> None:
        """Shadow-sample every device's current version once (its agreement before a rollout).

        In production the serving version was shadow-sampled during its own rollout; here
        each device sends one request at ``rate`` and waits for the teacher's answer.
        """
        for device in self.devices:
            for version in device.served():
                device.rates.set(MODEL, str(version), rate)
            device.infer(self.pixels)
        for device in self.devices:
            device.sampler.drain(10)
        # A teacher call that failed (its deadline, on a loaded machine) leaves a device
        # without a baseline, which a gate asking for one reads as missing evidence: ask
        # again until every device has one.
        deadline = time.monotonic() + 90
        while missing := [d for d in self.devices if not d.has_baseline()]:
            if time.monotonic() > deadline:
                raise AssertionError(f"no shadow baseline for {[d.name for d in missing]}")
            for device in missing:
                device.infer(self.pixels)
                device.sampler.drain(10)

    # ------------------------------------------------------------------ rollouts

    @contextlib.contextmanager
    def evidence(self, *, min_requests: int = 0, min_shadow_samples: int = 0) -> Iterator[None]:
        """Every device's health window waits for this much evidence meanwhile."""
        for device in self.devices:
            device.settings.fleet.min_requests = min_requests
            device.settings.fleet.min_shadow_samples = min_shadow_samples
        try:
            yield
        finally:
            for device in self.devices:
                device.settings.fleet.min_requests = 0
                device.settings.fleet.min_shadow_samples = 0

    def start(self, version: int, policy: RolloutPolicy, **labels: str) -> str:
        rollout, created = start_rollout(self.db, MODEL, version, self.sel(**labels), policy)
        assert created
        return rollout.id

    def wait_final(self, rollout_id: str, timeout_s: float = 60.0) -> str:
        wait_for(
            lambda: self.db.rollout(rollout_id).state in ("completed", "rolled_back"),
            timeout_s,
            f"rollout {rollout_id} to finish",
        )
        return self.db.rollout(rollout_id).state

    def close(self) -> None:
        self.controller.stop()
        # each goodbye waits a moment for its offline status to leave; 200 in parallel
        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(lambda device: device.stop(), self.devices))
        self.mqtt.stop()
        self.server.stop()


def policy(**overrides: object) -> RolloutPolicy:
    """A fast end-to-end policy: waves 1, 10 %, 50 %, 100 %, a 0.4 s health window."""
    values: dict[str, object] = {
        "waves": ["1", "10%", "50%", "100%"],
        "window_s": 0.4,
        "max_failure": "5%",
        "max_error_rate": 0.02,
        "max_p99_ratio": None,  # latency on a loaded 2-core box is noise (see E2EDevice)
        "max_agreement_drop": 0.05,
        "device_timeout_s": 20.0,
        "shadow_sample_rate": 0.25,
        "min_requests": 0,  # as the devices (E2EDevice); a test may ask for evidence
        "min_shadow_samples": 0,
        "min_baseline_samples": 0,  # the agreement gate's baseline: measure_baseline first
    }
    values.update(overrides)
    return RolloutPolicy(**values)  # type: ignore[arg-type]
