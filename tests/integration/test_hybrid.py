"""Edge and cloud together: real Mosquitto, real cloud workers, the real edge app.

The edge app is built from settings that route ``digits-teacher`` to the cloud, serve
``digits`` as a cascade of ``digits-student`` over ``digits-teacher``, and expose the other
routes under names of their own. Answers are compared with ONNX Runtime on the same files.
The module's tests run on Tether's tuned broker and again on a stock Mosquitto 2.0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from flask import Flask
from flask.testing import FlaskClient

from cloud.settings import CloudSettings
from cloud.worker import CloudWorker
from edge.agent import EdgeAgent
from edge.health import HealthRecorder
from edge.settings import load_settings
from edge.worker import build_app
from harness.broker import BROKER_KINDS, Broker
from models.digits import load_split
from serving.confidence import confidence
from serving.dataplane import Batched
from serving.settings import RuntimeSettings
from shared.codec import DecodedRequest
from shared.errors import Unavailable
from tests.conftest import REPOSITORY, ROOT

CPU = ["CPUExecutionProvider"]
THRESHOLD = 0.7
STUDENT, TEACHER = "digits-student", "digits-teacher"
ROUTES: dict[str, dict[str, Any]] = {
    TEACHER: {"mode": "cloud"},
    "digits": {
        "mode": "cascade",
        "local_model": STUDENT,
        "cloud_model": TEACHER,
        "threshold": THRESHOLD,
    },
    "digits-local": {"mode": "local", "local_model": STUDENT},
    "digits-local-first": {"mode": "local-first", "local_model": STUDENT, "cloud_model": TEACHER},
    "digits-cloud-first": {"mode": "cloud-first", "local_model": STUDENT, "cloud_model": TEACHER},
}

pytestmark = pytest.mark.skipif(
    not (REPOSITORY / TEACHER / "1" / "model.onnx").is_file(),
    reason="the digits models are not built (tether models build)",
)


def session(name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(REPOSITORY / name / "1" / "model.onnx"), providers=CPU)


def reference(name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(session(name).run(None, {"pixels": x})[0])


PIXELS, _LABELS = load_split("test")


def body(x: np.ndarray) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "pixels",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }


def post(client: FlaskClient, model: str, x: np.ndarray) -> tuple[int, dict[str, Any]]:
    response = client.post(f"/v2/models/{model}/infer", json=body(x))
    data = response.get_json()
    assert isinstance(data, dict)
    return response.status_code, data


def probabilities(data: dict[str, Any]) -> np.ndarray:
    out = data["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=BROKER_KINDS)
def hybrid_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Broker]:
    """A broker of this module's own, so no other test's workers share its requests:
    tuned, then stock."""
    stock = request.param == "stock"
    instance = Broker(tmp_path_factory.mktemp("hybrid-mosquitto"), stock=stock).start()
    yield instance
    instance.stop()


def start_worker(url: str, worker_id: str | None = None) -> CloudWorker:
    settings = CloudSettings(
        mqtt_url=url,
        worker_id=worker_id or f"cw-{uuid.uuid4().hex[:6]}",
        repository=REPOSITORY,
        models=[TEACHER, STUDENT],
        metrics_port=0,
        drain_timeout_s=2.0,
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
    )
    worker = CloudWorker(settings)
    worker.start()
    return worker


def make_app(url: str, data_dir: Path, **uplink: float) -> Flask:
    settings = load_settings(
        None,
        repository=REPOSITORY,
        data_dir=data_dir,
        mqtt_url=url,
        device_id="edge-it",
        routes=ROUTES,
        cloud_price_per_1000=0.4,
        runtime=RuntimeSettings(backend="onnxruntime", providers=CPU),
        uplink={"timeout_s": 3.0, "attempt_timeout_s": 0.6, "breaker_cooldown_s": 1.0, **uplink},
    )
    return build_app(settings)


def agent_of(app: Flask) -> EdgeAgent:
    agent = app.extensions["tether.agent"]
    assert isinstance(agent, EdgeAgent)
    return agent


@pytest.fixture(scope="module")
def workers(hybrid_broker: Broker) -> Iterator[list[CloudWorker]]:
    started = [start_worker(hybrid_broker.url), start_worker(hybrid_broker.url)]
    yield started
    for worker in started:
        worker.stop(drain=False, timeout_s=2.0)


@pytest.fixture(scope="module")
def edge_app(
    hybrid_broker: Broker, workers: list[CloudWorker], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Flask]:
    app = make_app(hybrid_broker.url, tmp_path_factory.mktemp("edge"))
    yield app
    agent_of(app).close()


@pytest.fixture
def client(edge_app: Flask) -> FlaskClient:
    return edge_app.test_client()


# ---------------------------------------------------------------------- behaviour


def test_teacher_is_served_by_the_cloud_and_not_loaded_on_the_edge(
    client: FlaskClient, edge_app: Flask
) -> None:
    x = PIXELS[:3]
    status, data = post(client, TEACHER, x)
    assert status == 200, data
    params = data["parameters"]
    assert params["served_by"] == "cloud" and params["route"] == "cloud"
    assert params["model"] == TEACHER and params["model_version"] == "1"
    assert params["network_ms"] >= 0 and params["cloud_ms"] >= 0 and "edge_ms" in params
    np.testing.assert_allclose(probabilities(data), reference(TEACHER, x), rtol=1e-5, atol=1e-6)
    assert TEACHER not in agent_of(edge_app).repository.served()
    meta = client.get(f"/v2/models/{TEACHER}").get_json()
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]


def test_cascade_escalates_only_low_confidence_inputs(client: FlaskClient) -> None:
    x = PIXELS[:60]
    student, teacher = reference(STUDENT, x), reference(TEACHER, x)
    low = confidence(student) < THRESHOLD
    assert 0 < low.sum() < len(x)  # the sample has both kinds
    for i in range(len(x)):
        status, data = post(client, "digits", x[i : i + 1])
        assert status == 200, data
        params = data["parameters"]
        expected = teacher if low[i] else student
        np.testing.assert_allclose(probabilities(data)[0], expected[i], rtol=1e-5, atol=1e-6)
        assert params["route"] == ("escalated" if low[i] else "local")
        assert params["served_by"] == ("cloud" if low[i] else "edge")
        assert params["model"] == (TEACHER if low[i] else STUDENT)
        assert params["confidence"] == pytest.approx(float(confidence(student)[i]), abs=1e-4)
    # one batch: only its low-confidence rows go up, the rest stay as the student said
    status, data = post(client, "digits", x)
    assert status == 200
    assert data["parameters"]["escalated_rows"] == int(low.sum())
    merged = np.where(low[:, None], teacher, student)
    np.testing.assert_allclose(probabilities(data), merged, rtol=1e-5, atol=1e-6)
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'tether_offload_ratio{model="digits"}' in metrics
    assert 'tether_cloud_cost_estimate_total{model="digits-teacher"}' in metrics
    assert 'tether_inference_flops_total{served_by="cloud"}' in metrics
    assert 'tether_inference_flops_total{served_by="edge"}' in metrics


def test_every_route_says_where_it_was_served(client: FlaskClient) -> None:
    x = PIXELS[:2]
    expected = {
        "digits-local": ("edge", "local", STUDENT),
        "digits-local-first": ("edge", "local", STUDENT),
        "digits-cloud-first": ("cloud", "cloud", TEACHER),
        TEACHER: ("cloud", "cloud", TEACHER),
    }
    for name, (served_by, route, model) in expected.items():
        status, data = post(client, name, x)
        assert status == 200, (name, data)
        params = data["parameters"]
        assert (params["served_by"], params["route"], params["model"]) == (served_by, route, model)
        np.testing.assert_allclose(probabilities(data), reference(model, x), rtol=1e-5, atol=1e-6)


def test_a_cloud_round_trip_waits_on_no_delayed_ack(client: FlaskClient) -> None:
    """``network_ms`` (round trip minus the cloud's own time) stays near the wire's cost on
    any broker. On a stock Mosquitto, QoS 1 makes every round trip wait for the peer's
    delayed-ACK timer (>= 40 ms on Linux), so even the fastest of 15 would take 40 ms;
    the fastest under 20 ms shows no such wait while scheduling noise on a loaded machine
    (which slows some round trips, never all) cannot fail it."""
    post(client, TEACHER, PIXELS[:1])
    network = sorted(
        post(client, TEACHER, PIXELS[i : i + 1])[1]["parameters"]["network_ms"] for i in range(15)
    )
    assert network[0] < 20.0, network


def test_two_cloud_workers_share_the_load(client: FlaskClient, workers: list[CloudWorker]) -> None:
    seen = set()
    for i in range(20):
        status, data = post(client, TEACHER, PIXELS[i : i + 1])
        assert status == 200
        seen.add(data["parameters"]["cloud_worker"])
    assert seen == {w.worker_id for w in workers}


def run_concurrently(
    count: int, call: Callable[[int], tuple[int, dict[str, Any]]]
) -> list[tuple[int, dict[str, Any], float]]:
    results: list[tuple[int, dict[str, Any], float]] = [(0, {}, 0.0)] * count

    def one(i: int) -> None:
        started = time.monotonic()
        status, data = call(i)
        results[i] = (status, data, time.monotonic() - started)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive(), "a request hung"
    return results


def test_a_killed_cloud_worker_costs_a_retry_not_a_hang(
    fresh_broker: Broker, tmp_path: Path
) -> None:
    """Requests in flight on a worker that dies are answered by the other one in time."""
    survivor = start_worker(fresh_broker.url, "survivor")
    victim = subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", "--mqtt-url", fresh_broker.url,
         "--repository", str(REPOSITORY), "--models", TEACHER, "--worker-id", "victim",
         "--metrics-port", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TETHER_CLOUD_RUNTIME__PROVIDERS": '["CPUExecutionProvider"]'},
    )  # fmt: skip
    app = make_app(fresh_broker.url, tmp_path / "edge")
    client = app.test_client()
    try:
        deadline = time.monotonic() + 20
        while True:  # until the victim answers: it has joined the share group
            status, data = post(client, TEACHER, PIXELS[:1])
            if status == 200 and data["parameters"].get("cloud_worker") == "victim":
                break
            assert time.monotonic() < deadline, "the subprocess worker never answered"
        victim.send_signal(signal.SIGSTOP)  # frozen: requests reach it and stay there
        killer = threading.Timer(0.3, victim.kill)
        killer.start()
        results = run_concurrently(8, lambda i: post(app.test_client(), TEACHER, PIXELS[i : i + 1]))
        killer.join()
    finally:
        victim.kill()
        victim.wait(timeout=5)
        agent_of(app).close()
        survivor.stop(drain=False, timeout_s=2.0)
    retried = 0
    for i, (status, data, elapsed) in enumerate(results):
        assert elapsed < 3.0 + 0.5, f"request {i} took {elapsed:.2f}s, past its 3 s deadline"
        assert status in (200, 503, 504), data
        if status == 200:
            assert data["parameters"]["cloud_worker"] == "survivor"
            retried += data["parameters"].get("cloud_attempts", 1) > 1
            expected = reference(TEACHER, PIXELS[i : i + 1])
            np.testing.assert_allclose(probabilities(data), expected, rtol=1e-5, atol=1e-6)
    assert sum(status == 200 for status, _, _ in results) == len(results)
    assert retried >= 1  # some went to the frozen worker first


@pytest.mark.parametrize("fresh_broker", BROKER_KINDS, indirect=True)
def test_broker_killed_and_restarted_mid_traffic(fresh_broker: Broker, tmp_path: Path) -> None:
    """Local routes never fail; cloud routes fail fast or degrade; all recover within 5 s."""
    worker = start_worker(fresh_broker.url)
    app = make_app(fresh_broker.url, tmp_path / "edge")
    client = app.test_client()
    x = PIXELS[:1]
    student = reference(STUDENT, PIXELS)
    unsure = PIXELS[np.flatnonzero(confidence(student) < THRESHOLD)[:1]]
    try:
        assert post(client, TEACHER, x)[0] == 200
        assert post(client, "digits", unsure)[1]["parameters"]["route"] == "escalated"
        fresh_broker.kill()
        time.sleep(0.2)
        for _ in range(3):
            for name in ("digits-local", "digits-local-first"):
                status, data = post(client, name, x)
                assert status == 200 and data["parameters"]["served_by"] == "edge"
            started = time.monotonic()
            status, data = post(client, TEACHER, x)
            assert status == 503 and time.monotonic() - started < 0.5
            assert "unreachable" in data["error"]
            status, data = post(client, "digits", unsure)
            assert status == 200 and data["parameters"]["route"] == "degraded"
            assert "cloud_error" in data["parameters"]
            status, data = post(client, "digits-cloud-first", x)
            assert status == 200 and data["parameters"]["route"] == "degraded"
            assert data["parameters"]["served_by"] == "edge"
        fresh_broker.start()
        back = time.monotonic()
        recovered: dict[str, float] = {}
        while len(recovered) < 3 and time.monotonic() - back < 5.0:
            for name, sample in ((TEACHER, x), ("digits", unsure), ("digits-cloud-first", x)):
                if name in recovered:
                    continue
                status, data = post(client, name, sample)
                if status == 200 and data["parameters"]["served_by"] == "cloud":
                    recovered[name] = time.monotonic() - back
            time.sleep(0.05)
        assert set(recovered) == {TEACHER, "digits", "digits-cloud-first"}, recovered
    finally:
        agent_of(app).close()
        worker.stop(drain=False, timeout_s=2.0)


def test_a_late_escalation_is_answered_through_the_data_plane_by_the_cloud(
    edge_app: Flask,
) -> None:
    """What the sensor bridge's corrections use: the cascade's cloud half as a runtime.
    Its answer is the teacher's, says it corrects a degraded one, is counted as the
    model's cloud request, and does not count towards the device version's health."""
    agent = agent_of(edge_app)
    plane = agent.dataplane
    recorder = HealthRecorder()
    plane.observers.append(recorder)
    try:
        late = plane.resolve_escalation("digits", None)
        x = PIXELS[:4]
        request = DecodedRequest(inputs={"pixels": x}, datatypes={"pixels": "FP32"})
        counted = agent.metrics.registry.get_sample_value(
            "tether_requests_total",
            {"model": "digits", "version": "1", "served_by": "cloud", "route": "escalated"},
        )
        (answer,) = plane.infer_batch(late, [request])
        assert isinstance(answer, Batched), answer
        params = answer.prediction.provenance.parameters()
        assert params["served_by"] == "cloud" and params["route"] == "escalated"
        assert params["corrects"] == "degraded" and params["model"] == TEACHER
        (scores,) = answer.prediction.outputs.values()
        np.testing.assert_allclose(scores, reference(TEACHER, x), rtol=1e-5, atol=1e-6)
        after = agent.metrics.registry.get_sample_value(
            "tether_requests_total",
            {"model": "digits", "version": "1", "served_by": "cloud", "route": "escalated"},
        )
        assert (after or 0.0) - (counted or 0.0) == 1.0
        assert recorder.counters("digits", "1").requests == 0
        plane.infer("digits", None, request)  # the cascade itself does count
        assert recorder.counters("digits", "1").requests == 1
        with pytest.raises(Unavailable):
            plane.resolve_escalation("digits-local", None)
    finally:
        plane.observers.remove(recorder)
