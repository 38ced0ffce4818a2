"""The router's five routes, with real ONNX models and a stub uplink (no broker needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge.agent import startup_models
from edge.breaker import CircuitBreaker
from edge.router import Router, read_model_metadata
from edge.settings import RouteSettings, load_settings
from edge.uplink import CloudReply, CloudUnreachable
from harness.onnx_models import dense_model, write_model
from serving.confidence import confidence
from serving.dataplane import DataPlane
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from shared.codec import DecodedRequest
from shared.errors import InternalError, InvalidInput, TetherError

CONFIG = {
    "max_batch_size": 16,
    "input": [{"name": "x", "datatype": "FP32", "dims": [4]}],
    "output": [{"name": "y", "datatype": "FP32", "dims": [3]}],
}
X = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32) * 0.5


class StubUplink:
    """Answers with the ``big`` ONNX model in-process, or fails as ``mode`` says."""

    connected = True

    def __init__(self, model_path: Path) -> None:
        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.breaker = CircuitBreaker()
        self.mode = "answer"
        self.calls: list[tuple[str, int]] = []

    def request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        datatypes: Mapping[str, str] | None = None,
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        timeout_s: float | None = None,
        trace_id: str | None = None,
    ) -> CloudReply:
        self.calls.append((model, int(inputs["x"].shape[0])))
        if self.mode == "down":
            raise CloudUnreachable("the cloud is unreachable: not connected")
        if self.mode == "bad":
            raise InvalidInput("cloud: bad input")
        (y,) = self.session.run(["y"], {"x": np.asarray(inputs["x"])})
        return CloudReply(
            outputs={"y": y},
            model_name=model,
            model_version="1",
            worker="w1",
            round_trip_ms=5.0,
            cloud_ms=2.0,
            compute_ms=1.5,
        )


def run(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(["y"], {"x": x})[0])


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repository"
    write_model(root, "small", dense_model(seed=0), config=CONFIG)
    write_model(root, "big", dense_model(seed=5), config=CONFIG)
    return root


@pytest.fixture
def parts(repo: Path) -> tuple[ModelRepository, StubUplink, EdgeMetrics]:
    repository = ModelRepository(repo)
    repository.load("small")
    return repository, StubUplink(repo / "big" / "1" / "model.onnx"), EdgeMetrics()


def plane(
    parts: tuple[ModelRepository, StubUplink, EdgeMetrics], routes: dict[str, Any], price: float = 0
) -> DataPlane:
    repository, uplink, metrics = parts
    router = Router(
        repository,
        {name: RouteSettings(**spec) for name, spec in routes.items()},
        uplink,  # type: ignore[arg-type]
        metrics=metrics,
        price_per_1000=price,
    )
    return DataPlane(repository, metrics, resolver=router.resolve)


def infer(dp: DataPlane, name: str, x: np.ndarray = X) -> tuple[np.ndarray, dict[str, Any]]:
    request = DecodedRequest(inputs={"x": x}, datatypes={"x": "FP32"})
    prediction = dp.infer(name, None, request)
    return prediction.outputs["y"], prediction.provenance.parameters()


def sessions(repo: Path) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return tuple(  # type: ignore[return-value]
        ort.InferenceSession(str(repo / n / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for n in ("small", "big")
    )


def test_unrouted_model_is_served_locally(parts: Any, repo: Path) -> None:
    y, params = infer(plane(parts, {}), "small")
    np.testing.assert_allclose(y, run(sessions(repo)[0], X), rtol=1e-6)
    assert params["served_by"] == "edge" and params["route"] == "local"
    assert params["model"] == "small" and params["model_version"] == "1"


def test_cloud_route_forwards_and_reads_metadata_without_loading(parts: Any, repo: Path) -> None:
    repository, _uplink, metrics = parts
    dp = plane(parts, {"big": {"mode": "cloud"}}, price=2.0)
    y, params = infer(dp, "big")
    np.testing.assert_allclose(y, run(sessions(repo)[1], X), rtol=1e-6)
    assert params["served_by"] == "cloud" and params["route"] == "cloud"
    assert params["model"] == "big" and params["network_ms"] == 3.0 and params["cloud_ms"] == 2.0
    assert "big" not in repository.served()
    meta = dp.model_metadata("big")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["served_by"] == "cloud"
    body = metrics.render()[0].decode()
    assert 'tether_cloud_cost_estimate_total{model="big"} 0.002' in body
    assert 'tether_offload_ratio{model="big"} 1.0' in body
    assert 'tether_inference_flops_total{served_by="cloud"}' in body


def test_startup_skips_cloud_only_models(repo: Path, tmp_path: Path) -> None:
    settings = load_settings(
        None, repository=repo, data_dir=tmp_path, routes={"big": {"mode": "cloud"}}
    )
    assert startup_models(settings) == ["small"]


def test_cascade_escalates_only_low_confidence_rows(parts: Any, repo: Path) -> None:
    _, uplink, metrics = parts
    small, big = sessions(repo)
    local = run(small, X)
    conf = confidence(local)
    threshold = float(np.median(conf))
    low = conf < threshold
    dp = plane(
        parts,
        {"m": {"mode": "cascade", "local_model": "small", "cloud_model": "big",
               "threshold": threshold}},
    )  # fmt: skip
    y, params = infer(dp, "m")
    assert uplink.calls == [("big", int(low.sum()))]
    np.testing.assert_allclose(y[~low], local[~low], rtol=1e-6)
    np.testing.assert_allclose(y[low], run(big, X[low]), rtol=1e-6)
    assert params["route"] == "escalated" and params["served_by"] == "cloud"
    assert params["escalated_rows"] == int(low.sum())
    assert params["confidence"] == pytest.approx([round(float(c), 4) for c in conf], abs=1e-4)
    body = metrics.render()[0].decode()
    assert f'tether_cascade_rows_total{{model="m",outcome="escalated"}} {float(low.sum())}' in body


def test_cascade_keeps_confident_answers_local(parts: Any, repo: Path) -> None:
    _, uplink, _ = parts
    dp = plane(parts, {"m": {"mode": "cascade", "local_model": "small", "cloud_model": "big",
                             "threshold": 0.0}})  # fmt: skip
    _y, params = infer(dp, "m", X[:1])
    assert uplink.calls == []
    assert params["route"] == "local" and params["served_by"] == "edge"
    assert params["model"] == "small" and isinstance(params["confidence"], float)


@pytest.mark.parametrize("measure", ["max_probability", "margin", "entropy"])
def test_cascade_degrades_to_the_local_answer_when_the_cloud_fails(
    parts: Any, repo: Path, measure: str
) -> None:
    _, uplink, _ = parts
    uplink.mode = "down"
    dp = plane(parts, {"m": {"mode": "cascade", "local_model": "small", "cloud_model": "big",
                             "threshold": 1.0, "confidence": measure}})  # fmt: skip
    y, params = infer(dp, "m")
    np.testing.assert_allclose(y, run(sessions(repo)[0], X), rtol=1e-6)
    assert params["route"] == "degraded" and params["served_by"] == "edge"
    assert "unreachable" in params["cloud_error"]


def test_local_first(parts: Any, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repository, uplink, _ = parts
    route = {"mode": "local-first", "cloud_model": "big"}
    y, params = infer(plane(parts, {"small": route}), "small")
    assert params["route"] == "local" and uplink.calls == []
    # over the queue limit: the cloud answers; if the cloud is down too, the device does
    y, params = infer(plane(parts, {"small": {**route, "max_queue": 0}}), "small")
    assert params["route"] == "overflow" and params["served_by"] == "cloud"
    uplink.mode = "down"
    y, params = infer(plane(parts, {"small": {**route, "max_queue": 0}}), "small")
    assert params["route"] == "local"
    # the local runtime fails: the cloud answers
    uplink.mode = "answer"

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise InternalError("GPU fell off the bus")

    monkeypatch.setattr(repository.get("small"), "predict", broken)
    y, params = infer(plane(parts, {"small": route}), "small")
    np.testing.assert_allclose(y, run(sessions(repo)[1], X), rtol=1e-6)
    assert params["route"] == "fallback" and "GPU fell off" in params["local_error"]
    uplink.mode = "down"
    with pytest.raises(TetherError) as info:
        infer(plane(parts, {"small": route}), "small")
    assert info.value.status == 503 and "GPU fell off" in info.value.message


def test_cloud_first(parts: Any, repo: Path) -> None:
    _, uplink, _ = parts
    dp = plane(parts, {"small": {"mode": "cloud-first", "cloud_model": "big"}})
    y, params = infer(dp, "small")
    np.testing.assert_allclose(y, run(sessions(repo)[1], X), rtol=1e-6)
    assert params["route"] == "cloud" and params["served_by"] == "cloud"
    uplink.mode = "down"
    y, params = infer(dp, "small")
    np.testing.assert_allclose(y, run(sessions(repo)[0], X), rtol=1e-6)
    assert params["route"] == "degraded" and params["served_by"] == "edge"
    uplink.mode = "bad"
    with pytest.raises(InvalidInput):
        infer(dp, "small")


def test_cloud_route_without_metadata_says_so(parts: Any) -> None:
    with pytest.raises(TetherError, match="declare them in the route"):
        plane(parts, {"huge": {"mode": "cloud"}}).resolve("huge", None)
    dp = plane(
        parts,
        {"huge": {"mode": "cloud", "cloud_model": "big",
                  "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                  "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}},
    )  # fmt: skip
    assert infer(dp, "huge")[1]["served_by"] == "cloud"


def test_read_model_metadata_from_the_graph(tmp_path: Path) -> None:
    write_model(tmp_path, "bare", dense_model(in_features=5, out_features=2))
    found = read_model_metadata(tmp_path / "bare")
    assert found is not None
    inputs, outputs, flops, _ = found
    assert [(s.name, s.datatype, s.shape) for s in inputs] == [("x", "FP32", (-1, 5))]
    assert [(s.name, s.shape) for s in outputs] == [("y", (-1, 2))]
    assert flops and flops > 0
    assert read_model_metadata(tmp_path / "missing") is None


def test_routes_from_toml(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(
        "cloud_price_per_1000 = 0.5\n[uplink]\ntimeout_s = 3.0\n"
        '[routes.digits-teacher]\nmode = "cloud"\n'
        '[routes.digits]\nmode = "cascade"\nlocal_model = "digits-student"\n'
        'cloud_model = "digits-teacher"\nthreshold = 0.8\nconfidence = "margin"\n'
    )
    settings = load_settings(config)
    assert settings.routes["digits"].threshold == 0.8
    assert settings.routes["digits-teacher"].mode == "cloud"
    assert settings.uplink.timeout_s == 3.0 and settings.cloud_price_per_1000 == 0.5
