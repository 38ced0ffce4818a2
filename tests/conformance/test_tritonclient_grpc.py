"""Conformance: the real ``tritonclient.grpc`` client against a running ``tether edge``.

The same cases as the HTTP suite (``test_tritonclient.py``): live, ready, metadata, infer
with raw and typed contents, errors, repository load/unload; plus tokens, scopes and rate
limits, which gRPC shares with HTTP. Results are compared with ``onnxruntime`` run directly.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from harness.agent_process import AgentProcess
from harness.broker import free_port
from tests.conftest import REPOSITORY

MODELS = ("digits-student", "digits-teacher")
ADMIN_TOKEN = "grpc-admin-token-0123456789"
INFER_TOKEN = "grpc-infer-token-0123456789"


def _agent(tmp: Path, **env: str) -> AgentProcess:
    return AgentProcess(
        tmp, repository=REPOSITORY, args=["--workers", "2"], grpc_port=free_port(), env=env
    )


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    process = _agent(tmp_path_factory.mktemp("agent"))
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{agent.grpc_port}")


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 17, size=(n, 64)).astype(np.float32)


def _reference(model: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(REPOSITORY / model / "1" / "model.onnx"))
    return np.asarray(session.run(["probabilities"], {"pixels": x})[0])


def _stub(agent: AgentProcess) -> service_pb2_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{agent.grpc_port}")
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def test_server_live_ready_and_metadata(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "tether"
    assert "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("model", MODELS)
def test_model_ready_and_metadata(client: grpcclient.InferenceServerClient, model: str) -> None:
    assert client.is_model_ready(model)
    assert client.is_model_ready(model, "1")
    meta = client.get_model_metadata(model, as_json=True)
    assert meta["name"] == model and meta["versions"] == ["1"]
    # protobuf's JSON form writes int64 as strings
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    assert client.get_model_metadata(model, "1").name == model


@pytest.mark.parametrize("model", MODELS)
def test_infer_with_raw_contents_matches_onnxruntime(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    x = _pixels(5, seed=len(model))
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # tritonclient.grpc sends raw_input_contents
    out = grpcclient.InferRequestedOutput("probabilities")
    result = client.infer(model, [inp], outputs=[out], request_id="conf-1")
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), _reference(model, x), rtol=1e-5, atol=1e-6
    )
    response = result.get_response()
    assert response.id == "conf-1"
    assert response.model_version == "1"
    assert response.parameters["served_by"].string_param == "edge"
    assert response.parameters["route"].string_param == "local"


def test_infer_with_typed_contents_matches_onnxruntime(agent: AgentProcess) -> None:
    x = _pixels(3, seed=7)
    request = service_pb2.ModelInferRequest(model_name="digits-student", id="typed")
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[3, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    response = _stub(agent).ModelInfer(request, timeout=10)
    (output,) = response.outputs
    assert output.name == "probabilities" and list(output.shape) == [3, 10]
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, 10)
    np.testing.assert_allclose(got, _reference("digits-student", x), rtol=1e-5, atol=1e-6)


def test_errors_reach_the_client_as_statuses(
    client: grpcclient.InferenceServerClient, agent: AgentProcess
) -> None:
    inp = grpcclient.InferInput("pixels", [1, 63], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(InferenceServerException, match="must have shape") as err:
        client.infer("digits-student", [inp])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND"
    wrong = grpcclient.InferInput("pixels", [1, 64], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 64), np.float64))
    with pytest.raises(InferenceServerException, match="must be FP32"):
        client.infer("digits-student", [wrong])
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as err:
        client.is_model_ready("nope")  # HTTP answers 404 here; gRPC says NOT_FOUND
    assert err.value.status() == "StatusCode.NOT_FOUND"
    # raw contents that do not match the declared shape are refused before use
    bad = service_pb2.ModelInferRequest(model_name="digits-student")
    bad.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    bad.raw_input_contents.append(b"\x00" * 7)
    with pytest.raises(grpc.RpcError) as rpc:
        _stub(agent).ModelInfer(bad, timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "need 256" in (rpc.value.details() or "")
    assert client.is_server_ready()


def test_repository_control_through_the_client(client: grpcclient.InferenceServerClient) -> None:
    index = {entry.name: entry for entry in client.get_model_repository_index().models}
    assert set(MODELS) <= set(index)
    assert index["digits-student"].state == "READY"
    client.unload_model("digits-teacher")
    assert not client.is_model_ready("digits-teacher")  # both workers agree at once
    assert not client.is_model_ready("digits-teacher")
    client.load_model("digits-teacher")
    assert client.is_model_ready("digits-teacher")
    assert client.is_model_ready("digits-teacher")


def test_tokens_scopes_and_rate_limits_match_http(tmp_path: Path) -> None:
    process = AgentProcess(
        tmp_path,
        repository=REPOSITORY,
        grpc_port=free_port(),
        env={
            "TETHER_API_TOKENS": f"{ADMIN_TOKEN},{INFER_TOKEN} infer",
            "TETHER_HTTP__RATE_LIMIT__ENABLED": "true",
            "TETHER_HTTP__RATE_LIMIT__RATE": "1",
            "TETHER_HTTP__RATE_LIMIT__BURST": "5",
        },
    )
    process.start()
    try:
        url = f"127.0.0.1:{process.grpc_port}"
        anonymous = grpcclient.InferenceServerClient(url=url)
        assert anonymous.is_server_live()  # health stays public, as on HTTP
        with pytest.raises(InferenceServerException) as err:
            anonymous.get_model_metadata("digits-student")
        assert err.value.status() == "StatusCode.UNAUTHENTICATED"
        infer_only = {"authorization": f"Bearer {INFER_TOKEN}"}
        assert anonymous.get_model_metadata("digits-student", headers=infer_only).name
        with pytest.raises(InferenceServerException) as err:
            anonymous.unload_model("digits-student", headers=infer_only)
        assert err.value.status() == "StatusCode.PERMISSION_DENIED"
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        anonymous.unload_model("digits-teacher", headers=admin)
        assert not anonymous.is_model_ready("digits-teacher", headers=admin)
        # a burst of 5, then RESOURCE_EXHAUSTED with retry-after, like HTTP's 429
        x = _pixels(1)
        codes = []
        for _ in range(8):
            inp = grpcclient.InferInput("pixels", [1, 64], "FP32")
            inp.set_data_from_numpy(x)
            try:
                anonymous.infer("digits-student", [inp], headers=infer_only)
                codes.append("OK")
            except InferenceServerException as exc:
                codes.append(str(exc.status()))
        assert "StatusCode.RESOURCE_EXHAUSTED" in codes
        assert codes.count("OK") <= 6
    finally:
        process.stop()


def test_grpc_port_zero_turns_grpc_off(tmp_path: Path) -> None:
    port = free_port()
    process = AgentProcess(tmp_path, repository=REPOSITORY, grpc_port=0)
    process.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=0.5)
        assert "gRPC" not in process.log()
    finally:
        process.stop()


def test_the_agent_survives_garbage_on_the_grpc_port(agent: AgentProcess) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", agent.grpc_port), timeout=5) as sock:
        sock.sendall(b"\x00\xff" * 500)
    huge = service_pb2.ModelInferRequest(model_name="digits-student")
    huge.inputs.add(name="pixels", datatype="FP32", shape=[1 << 40, 64])
    with pytest.raises(grpc.RpcError) as rpc:
        _stub(agent).ModelInfer(huge, timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{agent.grpc_port}")
    assert client.is_server_ready()


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    """``make proto`` output is committed; its descriptor must be what the .proto says (the
    version stamps of the generator may differ between machines, the schema may not)."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "-m", "edge.grpc.stubs", "--out", str(tmp_path)], cwd=root, check=True
    )

    def descriptor(path: Path) -> str:
        (line,) = [x for x in path.read_text().splitlines() if x.startswith("DESCRIPTOR = ")]
        return line

    committed = root / "edge" / "grpc" / "grpc_predict_v2_pb2.py"
    assert descriptor(tmp_path / committed.name) == descriptor(committed), "run `make proto`"


def test_the_service_shares_a_process_with_tritonclient() -> None:
    """The agent's messages live in their own descriptor pool: importing them beside
    tritonclient.grpc (same ``inference.*`` names) does not clash."""
    from edge.grpc import grpc_predict_v2_pb2 as ours

    assert ours.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    theirs = service_pb2.ModelInferRequest(model_name="m", id="x")
    assert ours.ModelInferRequest.FromString(theirs.SerializeToString()).id == "x"
