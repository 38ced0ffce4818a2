"""The local Open Inference Protocol API, through Flask's test client."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient

from shared.codec import HEADER_LENGTH_HEADER, decode_response, encode_request


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def _infer_json(data: list[float], shape: list[int], datatype: str = "FP32") -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}


def test_health_and_server_metadata(client: FlaskClient) -> None:
    assert client.get("/v2/health/live").json == {"live": True}
    assert client.get("/v2/health/ready").json == {"ready": True}
    meta = client.get("/v2").json
    assert meta is not None and meta["name"] == "tether"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_follows_config_and_version_policy(client: FlaskClient) -> None:
    meta = client.get("/v2/models/dense").json
    assert meta is not None
    assert meta["versions"] == ["2"]  # latest 1 of versions 1 and 2
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
    assert client.get("/v2/models/dense/versions/1").status_code == 404
    assert client.get("/v2/models/dense/versions/2/ready").json == {"name": "dense", "ready": True}
    plain = client.get("/v2/models/plain").json
    assert plain is not None and plain["inputs"][0]["shape"] == [-1, 2]


def test_infer_json_matches_onnxruntime(client: FlaskClient, repository: object) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 10
    response = client.post("/v2/models/dense/infer", json=_infer_json(x.ravel().tolist(), [2, 4]))
    assert response.status_code == 200, response.data
    body = response.json
    assert body is not None
    session = ort.InferenceSession(str(repository) + "/dense/2/model.onnx")  # type: ignore[operator]
    expected = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(
        np.array(body["outputs"][0]["data"]).reshape(2, 3), expected, rtol=1e-6
    )
    assert body["model_name"] == "dense" and body["model_version"] == "2"
    params = body["parameters"]
    assert params["served_by"] == "edge" and params["route"] == "local"
    assert params["compute_ms"] >= 0 and params["edge_ms"] >= params["compute_ms"]


def test_infer_binary_in_and_out(client: FlaskClient) -> None:
    x = np.ones((3, 4), dtype=np.float32)
    body, length = encode_request(
        {"x": x}, parameters={"binary_data_output": True}, request_id="r-7"
    )
    response = client.post(
        "/v2/models/dense/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    out_length = int(response.headers[HEADER_LENGTH_HEADER])
    parsed = decode_response(response.data, out_length)
    assert parsed["id"] == "r-7"
    assert parsed["outputs"][0]["data"].shape == (3, 3)
    np.testing.assert_allclose(parsed["outputs"][0]["data"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{", 400, "malformed JSON"),
        (orjson.dumps(_infer_json([1, 2, 3], [1, 4])), 400, "needs 4 elements"),
        (orjson.dumps(_infer_json([1, 2, 3, 4], [1, 4], "INT32")), 400, "must be FP32"),
        (orjson.dumps(_infer_json([1, 2, 3], [1, 3])), 400, "must have shape"),
        (orjson.dumps(_infer_json([0.0] * 40, [10, 4])), 400, "max_batch_size"),
        (
            orjson.dumps(
                {"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
            ),
            400,
            "takes inputs",
        ),
        (
            orjson.dumps({**_infer_json([1.0] * 4, [1, 4]), "outputs": [{"name": "nope"}]}),
            400,
            "no output",
        ),
    ],
)
def test_bad_input_gets_4xx_with_error_body(
    client: FlaskClient, body: bytes, status: int, message: str
) -> None:
    response = client.post("/v2/models/dense/infer", data=body)
    assert response.status_code == status
    assert response.json is not None and message in response.json["error"]
    assert client.get("/v2/health/ready").status_code == 200  # still serving


def test_non_finite_values_are_rejected(client: FlaskClient) -> None:
    x = np.array([[1.0, np.nan, 0.0, np.inf]], dtype=np.float32)
    body, length = encode_request({"x": x})
    response = client.post(
        "/v2/models/dense/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 400
    assert response.json is not None and "NaN or infinite" in response.json["error"]


def test_bad_binary_header_lengths(client: FlaskClient) -> None:
    body, _ = encode_request({"x": np.ones((1, 4), np.float32)})
    for header in ("abc", str(len(body) + 10), "-5"):
        response = client.post(
            "/v2/models/dense/infer", data=body, headers={HEADER_LENGTH_HEADER: header}
        )
        assert response.status_code == 400, header
        assert response.json is not None and "error" in response.json


def test_unknown_model_version_and_route(client: FlaskClient) -> None:
    assert client.post("/v2/models/nope/infer", data=b"{}").status_code == 404
    response = client.post("/v2/models/dense/versions/9/infer", json=_infer_json([1] * 4, [1, 4]))
    assert response.status_code == 404
    assert response.json is not None and "no served version" in response.json["error"]
    missing = client.get("/v2/nothing-here")
    assert missing.status_code == 404 and missing.json is not None and "error" in missing.json
    assert client.get("/v2/models/dense/infer").status_code == 405


def test_body_over_the_limit_is_413(settings: object) -> None:
    from edge.settings import EdgeSettings
    from edge.worker import build_app

    assert isinstance(settings, EdgeSettings)
    small = settings.model_copy(
        update={"http": settings.http.model_copy(update={"max_body_bytes": 2048})}
    )
    client = build_app(small).test_client()
    response = client.post("/v2/models/dense/infer", data=b"{" + b" " * 5000 + b"}")
    assert response.status_code == 413
    assert response.json is not None and "2048 bytes" in response.json["error"]


def test_repository_extension_load_unload(client: FlaskClient) -> None:
    index = client.post("/v2/repository/index").json
    assert {"name": "dense", "version": "2", "state": "READY", "reason": ""} in index  # type: ignore[operator]
    assert client.post("/v2/repository/models/dense/unload").status_code == 200
    assert client.get("/v2/models/dense/ready").status_code == 503
    infer = client.post("/v2/models/dense/infer", json=_infer_json([1] * 4, [1, 4]))
    assert infer.status_code == 503 and "not loaded" in infer.json["error"]  # type: ignore[index]
    index = client.post("/v2/repository/index").json
    assert {"name": "dense", "state": "UNAVAILABLE", "reason": "unloaded"} in index  # type: ignore[operator]
    assert client.post("/v2/repository/models/dense/load").status_code == 200
    assert client.get("/v2/models/dense/ready").status_code == 200
    assert client.post("/v2/repository/models/ghost/load").status_code == 404
    assert client.post("/v2/repository/models/..%2Fetc/load").status_code in (400, 404)


def test_metrics_split_request_and_compute_time(client: FlaskClient) -> None:
    client.post("/v2/models/dense/infer", json=_infer_json([1] * 4, [1, 4]))
    client.post("/v2/models/dense/infer", json=_infer_json([1] * 3, [1, 4]))
    text = client.get("/metrics").data.decode()
    assert (
        'tether_requests_total{model="dense",route="local",served_by="edge",version="2"} 1.0'
        in text
    )
    assert 'tether_request_failures_total{model="dense",reason="invalid_input"} 1.0' in text
    assert "tether_request_duration_seconds_bucket" in text
    assert "tether_compute_duration_seconds_bucket" in text
    assert (
        'tether_model_ready{model="dense",provider="CPUExecutionProvider",version="2"} 1.0' in text
    )
