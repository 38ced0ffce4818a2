"""The cloud worker against a real Mosquitto and real ONNX Runtime."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.cloud.conftest import Asker, WorkerFactory, reference


def rows(n: int, features: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)


def test_result_equals_onnxruntime(
    make_worker: WorkerFactory, asker: Asker, repository_dir: Path
) -> None:
    worker, calls = make_worker()
    x = rows(3)
    request_id = asker.ask("dense", x)
    (reply,) = asker.collect(1)
    assert reply.kind == "infer_response"
    assert reply.header["request_id"] == request_id
    assert reply.header["worker"] == worker.worker_id
    assert reply.header["batch_size"] == 3
    response = reply.header["response"]
    assert response["model_name"] == "dense"
    assert response["model_version"] == "1"
    assert response["parameters"]["served_by"] == "cloud"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4
    np.testing.assert_allclose(reply.outputs["y"], reference(repository_dir, "dense", x), 1e-6)
    assert reply.message.correlation_data is not None
    assert calls.rows == [3]
    assert worker.metrics.sample("tether_cloud_requests_total", model="dense", version="1") == 1
