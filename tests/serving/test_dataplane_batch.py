"""The data plane's batch entry: one run for valid requests, each answer its own rows,
one request's bad data its own error; and each side's metrics under its own names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from cloud.metrics import CloudMetrics
from harness.onnx_models import dense_model, write_model
from serving.dataplane import Batched, DataPlane
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from serving.runtimes import Runtime, RuntimeOptions, TensorSpec
from shared.codec import DecodedRequest, OutputRequest
from shared.errors import InvalidInput, TetherError

CPU = ("CPUExecutionProvider",)


class Totals(Runtime):
    """A model of batched input rows whose only output is one number, not batch-major."""

    def __init__(self, fail_on: float | None = None) -> None:
        super().__init__("totals", "1")
        self.inputs = [TensorSpec("x", "FP32", (-1, 2))]
        self.outputs = [TensorSpec("total", "FP32", ())]
        self.max_batch_size = 16
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.mark_ready()

    def load(self) -> None:
        pass

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.calls.append(len(x))
        if self.fail_on is not None and (x == self.fail_on).any():
            raise InvalidInput("a row this model cannot read")
        return {"total": np.asarray(x.sum(), dtype=np.float32)}


def request(x: np.ndarray, outputs: list[str] | None = None) -> DecodedRequest:
    wanted = [OutputRequest(name) for name in outputs] if outputs else None
    return DecodedRequest(inputs={"x": x}, datatypes={"x": "FP32"}, outputs=wanted)


def rows(n: int, seed: int, features: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)


@pytest.fixture
def dense(tmp_path: Path) -> ModelRepository:
    write_model(tmp_path, "dense", dense_model(4, 3, seed=1))
    repository = ModelRepository(tmp_path, RuntimeOptions(providers=CPU), backend="onnxruntime")
    repository.load("dense")
    return repository


def test_valid_requests_run_once_and_a_bad_one_fails_alone(dense: ModelRepository) -> None:
    metrics = EdgeMetrics()
    plane = DataPlane(dense, metrics)
    runtime = dense.get("dense")
    bad = rows(1, seed=2)
    bad[0, 1] = np.nan
    asked = [request(rows(2, seed=1)), request(bad), request(rows(3, seed=3))]
    answers = plane.infer_batch(runtime, asked)
    first, failed, last = answers
    assert isinstance(failed, InvalidInput) and "NaN" in failed.message
    assert isinstance(first, Batched) and isinstance(last, Batched)
    assert (first.requests, first.rows) == (last.requests, last.rows) == (2, 5)
    for answer, sent in ((first, asked[0]), (last, asked[2])):
        alone = runtime.infer(sent.inputs).outputs["y"]
        np.testing.assert_allclose(answer.prediction.outputs["y"], alone, rtol=1e-5, atol=1e-6)
    answered = {"model": "dense", "version": "1", "served_by": "edge", "route": "local"}
    failed_labels = {"model": "dense", "reason": "invalid_input"}
    assert metrics.registry.get_sample_value("tether_requests_total", answered) == 2
    assert metrics.registry.get_sample_value("tether_request_failures_total", failed_labels) == 1


def test_unknown_output_fails_that_request_only(dense: ModelRepository) -> None:
    plane = DataPlane(dense, CloudMetrics())
    runtime = dense.get("dense")
    answers = plane.infer_batch(runtime, [request(rows(1, 1), ["nope"]), request(rows(1, 2))])
    assert isinstance(answers[0], TetherError) and answers[0].status == 400
    assert "has no output 'nope'" in answers[0].message
    assert isinstance(answers[1], Batched)


def test_outputs_not_batch_major_run_one_by_one(dense: ModelRepository) -> None:
    runtime = Totals()
    plane = DataPlane(dense, CloudMetrics())
    xs = [np.full((n, 2), n, np.float32) for n in (1, 2, 3)]
    answers = plane.infer_batch(runtime, [request(x) for x in xs])
    assert runtime.calls == [6, 1, 2, 3]  # the stacked run, then each alone
    for answer, x in zip(answers, xs, strict=True):
        assert isinstance(answer, Batched) and (answer.requests, answer.rows) == (1, len(x))
        assert float(answer.prediction.outputs["total"]) == pytest.approx(float(x.sum()))


def test_a_client_error_in_the_stacked_run_costs_its_request_only(dense: ModelRepository) -> None:
    runtime = Totals(fail_on=7.0)
    plane = DataPlane(dense, CloudMetrics())
    answers = plane.infer_batch(
        runtime, [request(np.ones((1, 2), np.float32)), request(np.full((1, 2), 7, np.float32))]
    )
    assert isinstance(answers[0], Batched)
    assert isinstance(answers[1], InvalidInput)


def test_cloud_metrics_keep_their_names(dense: ModelRepository) -> None:
    metrics = CloudMetrics()
    plane = DataPlane(dense, metrics)
    runtime = dense.get("dense")
    bad = rows(1, seed=9, features=5)
    plane.infer_batch(runtime, [request(rows(1, 1)), request(rows(2, 2)), request(bad)])
    plane.publish_readiness()
    assert metrics.sample("tether_cloud_requests_total", model="dense", version="1") == 2
    assert metrics.sample("tether_cloud_failures_total", model="dense", reason="invalid_input") == 1
    assert metrics.sample("tether_cloud_batch_size_sum", model="dense") == 3
    assert metrics.sample("tether_cloud_batch_requests_sum", model="dense") == 2
    assert metrics.sample("tether_cloud_compute_seconds_count", model="dense", version="1") == 1
    ready = {"model": "dense", "version": "1", "provider": "CPUExecutionProvider"}
    assert metrics.sample("tether_cloud_model_ready", **ready) == 1
    dense.unload("dense")
    plane.publish_readiness()
    assert metrics.sample("tether_cloud_model_ready", **ready) == 0
