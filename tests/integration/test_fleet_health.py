"""The fleet agent beside a real ``tether edge`` server judges versions by the workers'
figures: requests, errors, p99 and shadow agreement scraped from ``/metrics``."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnx
import orjson
import pytest

from cloud.artifacts import pack_version
from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.agent import control_file_path
from edge.fleet_agent import FleetAgent
from edge.fleet_health import (
    FileShadowRates,
    MetricsHealthSource,
    parse_health,
    shadow_rates_path,
)
from edge.fleet_target import ControlFileTarget
from edge.health import HealthCounters
from edge.settings import load_settings
from harness.agent_process import AgentProcess
from harness.broker import Broker
from models.digits import load_split
from serving.control_file import ControlFile
from serving.settings import RuntimeSettings
from shared.manifest import generate_key, public_key_text
from tests.conftest import REPOSITORY
from tests.edge.fleet_support import ArtifactServer, Controller, signed_order
from tests.integration.fleet_e2e import MODEL, TEACHER, permuted_student, student, wait_for

TOKEN = "fleet-health-test-token-0123456789"


def test_parse_health_turns_metrics_into_per_version_counters() -> None:
    text = (
        'tether_requests_total{model="m",version="2",served_by="edge",route="local"} 7\n'
        'tether_requests_total{model="m",version="2",served_by="cloud",route="cascade"} 3\n'
        'tether_request_errors_total{model="m",version="2"} 2\n'
        'tether_shadow_samples_total{model="m",version="2"} 40\n'
        'tether_shadow_agreements_total{model="m",version="2"} 30\n'
        'tether_request_duration_seconds_bucket{model="m",version="2",le="0.001"} 5\n'
        'tether_request_duration_seconds_bucket{model="m",version="2",le="0.0025"} 9\n'
        'tether_request_duration_seconds_bucket{model="m",version="2",le="+Inf"} 10\n'
        'tether_request_duration_seconds_count{model="m",version="2"} 10\n'
    )
    counters = parse_health(text)[("m", "2")]
    assert (counters.requests, counters.errors) == (12, 2)
    assert (counters.shadow_samples, counters.shadow_agreements) == (40, 30)
    assert counters.answered == 10
    assert counters.p99_ms() == 20000.0  # the one request over the last bound
    assert HealthCounters(buckets=(*counters.buckets[:-1], 0)).p99_ms() == 3.0  # 2.5 ms -> 3


def test_file_shadow_rates_reach_another_reader(tmp_path: Path) -> None:
    writer = FileShadowRates(tmp_path / "run" / "rates.json")
    reader = FileShadowRates(tmp_path / "run" / "rates.json", refresh_s=0.0)
    assert reader.get("m", "2") == 0.0
    writer.set("m", "2", 0.5)
    assert reader.get("m", "2") == 0.5
    writer.clear("m")
    time.sleep(0.01)  # a distinct modification time
    writer.set("other", "1", 1.0)
    assert reader.get("m", "2") == 0.0 and reader.get("other", "1") == 1.0


# ---------------------------------------------------------------------------- end to end


@pytest.fixture
def teacher_worker(broker: Broker) -> Iterator[CloudWorker]:
    settings = CloudSettings(
        mqtt_url=broker.url,
        worker_id=f"health-teacher-{uuid.uuid4().hex[:6]}",
        repository=REPOSITORY,
        models=[TEACHER],
        metrics_port=0,
        drain_timeout_s=2.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
    )
    worker = CloudWorker(settings)
    worker.start()
    yield worker
    worker.stop(drain=False)


def _artifact(root: Path, model: onnx.ModelProto, version: int) -> bytes:
    folder = root / MODEL / str(version)
    folder.mkdir(parents=True)
    shutil.copy(REPOSITORY / MODEL / "config.json", root / MODEL / "config.json")
    onnx.save(model, folder / "model.onnx")
    return pack_version(folder)[0]


class Requests:
    """HTTP inference requests against the server on a thread, with the bearer token."""

    def __init__(self, url: str) -> None:
        pixels = load_split("test")[0][:8]
        body = {"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "FP32"}]}
        body["inputs"][0]["data"] = pixels.ravel().tolist()
        self.body = orjson.dumps(body)
        self.url = f"{url}/v2/models/{MODEL}/infer"
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Requests:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            request = urllib.request.Request(self.url, data=self.body, method="POST")
            request.add_header("Authorization", f"Bearer {TOKEN}")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    version = str(orjson.loads(response.read())["model_version"])
                    self.versions[version] = self.versions.get(version, 0) + 1
            except Exception as exc:
                self.failures.append(repr(exc))
            time.sleep(0.01)


def test_fleet_agent_beside_the_server_judges_by_the_workers_figures(
    tmp_path: Path, broker: Broker, teacher_worker: CloudWorker
) -> None:
    repo = tmp_path / "repository"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(REPOSITORY / MODEL / "config.json", repo / MODEL / "config.json")
    shutil.copy(REPOSITORY / MODEL / "1" / "model.onnx", repo / MODEL / "1" / "model.onnx")
    key = generate_key()
    device = f"health-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "edge.toml"
    config.write_text(
        f'device_id = "{device}"\nmqtt_url = "{broker.url}"\nrepository = "{repo}"\n'
        f'data_dir = "{tmp_path / "data"}"\nmodels = ["{MODEL}"]\n'
        "[http]\nworkers = 2\nthreads = 2\n"
        f'[http.auth]\ntokens = ["{TOKEN}"]\n'
        "[uplink]\nenabled = true\n"
        '[runtime]\nbackend = "onnxruntime"\nproviders = ["CPUExecutionProvider"]\n'
        f'[fleet]\ntrusted_keys = ["{public_key_text(key)}"]\nstatus_interval_s = 30\n'
        "min_shadow_agreement = 0.5\nmax_p99_ratio = 1000.0\n"
    )
    server = AgentProcess(tmp_path / "data", config=config)
    server.start(ready_timeout_s=60)
    settings = load_settings(config, http={"port": server.port})
    health = MetricsHealthSource.from_settings(settings)
    rates = FileShadowRates(shadow_rates_path(settings))
    agent = FleetAgent(
        settings,
        ControlFileTarget(ControlFile(control_file_path(settings)), settings.repository),
        health=health,
        shadow_rates=rates,
    )
    artifacts = ArtifactServer().start()
    controller = Controller(broker.url, key)
    try:
        agent.start()
        # The version serving now was shadow-sampled in its own rollout: measure it.
        rates.set(MODEL, "1", 1.0)
        with Requests(server.url) as traffic:
            wait_for(
                lambda: health.counters(MODEL, "1").shadow_samples >= 40,
                30,
                f"shadow samples of v1 in /metrics ({health.last_error})",
            )
        assert traffic.failures == []

        # A good version: committed with the workers' figures.
        good = signed_order(
            key,
            artifacts,
            _artifact(tmp_path / "publish", student(), 2),
            model=MODEL,
            version=2,
            health_window_s=3.0,
            shadow_sample_rate=1.0,
        )
        with Requests(server.url) as traffic:
            controller.send(device, good)
            committed = controller.wait_step(good.rollout_id, "committed", timeout_s=60)
        report = committed.health
        assert report is not None
        assert report.requests > 0 and report.errors == 0 and report.p99_ms is not None
        assert report.shadow_samples > 0 and (report.shadow_agreement or 0) > 0.8
        assert report.baseline_p99_ms is not None
        assert report.baseline_shadow_agreement is not None
        assert report.baseline_shadow_agreement > 0.8
        # ... and how many samples it rests on (schema 1.2): v1's, from the workers' /metrics.
        assert (report.baseline_shadow_samples or 0) >= 40
        assert traffic.failures == [] and traffic.versions.get("2", 0) > 0

        # A version that loads fine but disagrees with the teacher: the agent's own window
        # check, on the workers' shadow figures, rolls it back.
        bad = signed_order(
            key,
            artifacts,
            _artifact(tmp_path / "publish", permuted_student(), 3),
            model=MODEL,
            version=3,
            health_window_s=3.0,
            shadow_sample_rate=1.0,
        )
        with Requests(server.url) as traffic:
            controller.send(device, bad)
            rolled = controller.wait_step(bad.rollout_id, "rolled_back", timeout_s=60)
        assert "shadow agreement" in rolled.reason, rolled.reason
        assert rolled.health is not None and rolled.health.shadow_agreement is not None
        assert rolled.health.shadow_agreement < 0.5
        assert (rolled.health.baseline_shadow_agreement or 0.0) > 0.8
        assert traffic.failures == []
        control = orjson.loads((tmp_path / "data" / "run" / "repository.json").read_bytes())
        assert control[MODEL]["versions"] == [2]
        assert rates.get(MODEL, "3") == 0.0
    finally:
        agent.stop()
        controller.clear(device)
        controller.stop()
        artifacts.stop()
        server.stop()
