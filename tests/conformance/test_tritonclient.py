"""Conformance: the real ``tritonclient.http`` client against a running ``tether edge``.

Results are compared with ``onnxruntime`` run directly on the same ONNX files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from harness.agent_process import AgentProcess
from tests.conftest import REPOSITORY

MODELS = ("digits-student", "digits-teacher")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = AgentProcess(tmp_path_factory.mktemp("agent"), repository=REPOSITORY)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}")


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)).astype(np.float32)


def _reference(model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(REPOSITORY / model / "1" / "model.onnx"))
    return np.asarray(session.run(["probabilities"], {"pixels": x})[0])


def test_server_live_ready_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "tether"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_and_metadata(client: httpclient.InferenceServerClient, model: str) -> None:
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model)
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata(model, "1")["name"] == model


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False)])
def test_infer_matches_onnxruntime(
    client: httpclient.InferenceServerClient, model: str, binary_in: bool, binary_out: bool
) -> None:
    x = _pixels(5, seed=hash((model, binary_in)) % 100)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = client.infer(model, [inp], outputs=[out], request_id="conf-1")
    got = result.as_numpy("probabilities")
    np.testing.assert_allclose(got, _reference(model, x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "conf-1"
    assert response["parameters"]["served_by"] == "edge"


def test_error_bodies_reach_the_client(client: httpclient.InferenceServerClient) -> None:
    inp = httpclient.InferInput("pixels", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), np.float32), binary_data=False)
    with pytest.raises(InferenceServerException, match="must have shape"):
        client.infer("digits-student", [inp])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")
    wrong = httpclient.InferInput("pixels", [1, 64], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float64))
    with pytest.raises(InferenceServerException, match="must be FP32"):
        client.infer("digits-student", [wrong])
    assert not client.is_model_ready("nope")
    assert client.is_server_ready()


def test_repository_control_through_the_client(client: httpclient.InferenceServerClient) -> None:
    index = {entry["name"]: entry for entry in client.get_model_repository_index()}
    assert set(MODELS) <= set(index)
    client.unload_model("digits-teacher")
    assert not client.is_model_ready("digits-teacher")  # every worker agrees at once
    assert not client.is_model_ready("digits-teacher")
    client.load_model("digits-teacher")
    assert client.is_model_ready("digits-teacher")
    assert client.is_model_ready("digits-teacher")


def test_metrics_endpoint_merges_worker_processes(agent: AgentProcess) -> None:
    import urllib.request

    x = _pixels(1)
    c = httpclient.InferenceServerClient(url=f"127.0.0.1:{agent.port}", concurrency=4)
    for _ in range(20):
        inp = httpclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x)
        c.infer("digits-student", [inp])
    text = urllib.request.urlopen(agent.url + "/metrics").read().decode()
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tether_requests_total{") and 'model="digits-student"' in line
    ]
    assert sum(counts) >= 20
    assert (
        'tether_model_ready{model="digits-student",provider="CPUExecutionProvider",version="1"} 1.0'
        in text
    )


def test_agent_survives_garbage(agent: AgentProcess) -> None:
    import http.client

    for body, headers in [
        (b"\x00\xff" * 100, {"Content-Type": "application/json"}),
        (b"{}", {"Inference-Header-Content-Length": "99999"}),
        (b'{"inputs":[{"name":"pixels","shape":[1,64],"datatype":"FP32","data":[1e999]}]}', {}),
    ]:
        conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)
        conn.request("POST", "/v2/models/digits-student/infer", body=body, headers=headers)
        response = conn.getresponse()
        assert 400 <= response.status < 500, response.read()
        assert b'"error"' in response.read()
    assert Path(agent.data_dir).exists()
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)
    conn.request("GET", "/v2/health/ready")
    assert conn.getresponse().status == 200
