"""Texts through the V2 API around the real ``news-minilm`` (in-process app): newsgroup
labels back, and bad texts as 4xx ``{"error"}`` answers, never a crash
(tests/integration/test_news.py runs the ``news`` cascade through a real ``tether edge``,
cloud worker and Mosquitto)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient

from harness.edge_app import edge_app
from harness.news import REPOSITORY, STUDENT, news_built, texts_array
from serving.model_config import load_model_config
from serving.pipelines.config import PipelineConfig, TextInput
from shared.codec import HEADER_LENGTH_HEADER, decode_response, encode_request

HOCKEY = (
    "the goalie stopped forty shots and the penalty killing was superb as the team won the "
    "playoff game in overtime; the nhl season ends with the stanley cup finals"
)


@pytest.fixture(scope="module")
def built() -> None:
    if not news_built():
        pytest.fail("the news models are not built: run `make install` (tether models build)")


def test_the_news_configs_declare_the_text_and_labels_stages(built: None) -> None:
    config = load_model_config(REPOSITORY / STUDENT)
    assert isinstance(config.pipeline, PipelineConfig)
    assert isinstance(config.pipeline.input, TextInput)
    assert [t.name for t in config.client_inputs()] == ["text"]
    assert [t.name for t in config.client_outputs()] == ["probabilities", "labels"]


# ---------------------------------------------------------------------- the V2 API


@pytest.fixture(scope="module")
def app(built: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flask]:
    with edge_app(tmp_path_factory.mktemp("news"), [REPOSITORY / STUDENT]) as application:
        yield application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def infer(client: FlaskClient, inputs: list[dict[str, object]]) -> tuple[int, dict]:
    response = client.post(f"/v2/models/{STUDENT}/infer", json={"inputs": inputs})
    assert response.json is not None
    return response.status_code, response.json


def test_metadata_shows_the_text_input_and_the_labels_output(client: FlaskClient) -> None:
    meta = client.get(f"/v2/models/{STUDENT}").json
    assert meta is not None
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert {"name": "labels", "datatype": "BYTES", "shape": [-1, 5]} in meta["outputs"]


def test_json_texts_get_probabilities_and_newsgroup_labels(client: FlaskClient) -> None:
    status, body = infer(
        client,
        [{"name": "text", "shape": [2], "datatype": "BYTES", "data": [HOCKEY, "ok " + HOCKEY]}],
    )
    assert status == 200, body
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 20]
    assert np.allclose(np.reshape(outputs["probabilities"]["data"], (2, 20)).sum(axis=1), 1.0)
    assert outputs["labels"]["shape"] == [2, 5]
    assert outputs["labels"]["data"][0] == "rec.sport.hockey"
    assert body["parameters"]["served_by"] == "edge"


def test_binary_texts_through_the_binary_extension(client: FlaskClient) -> None:
    body, length = encode_request({"text": texts_array([HOCKEY])}, {"text": "BYTES"})
    response = client.post(
        f"/v2/models/{STUDENT}/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 200, response.data
    parsed = decode_response(
        response.data, int(response.headers.get(HEADER_LENGTH_HEADER, 0)) or None
    )
    labels = {o["name"]: o["data"] for o in parsed["outputs"]}["labels"]
    assert labels[0][0] in (b"rec.sport.hockey", "rec.sport.hockey")


@pytest.mark.parametrize(
    ("tensor", "status", "message"),
    [
        ({"datatype": "BYTES", "data": [""]}, 400, "text 0: empty"),
        ({"datatype": "FP32", "data": [1.0]}, 400, "must be BYTES"),
        ({"datatype": "INT64", "data": [101]}, 400, "must be BYTES"),
    ],
)
def test_bad_texts_through_the_api_are_4xx_errors(
    client: FlaskClient, tensor: dict[str, object], status: int, message: str
) -> None:
    code, body = infer(client, [{"name": "text", "shape": [1], **tensor}])
    assert code == status and message in body["error"], body


def test_non_utf8_bytes_are_a_400_and_the_server_carries_on(client: FlaskClient) -> None:
    texts = np.empty(1, dtype=object)
    texts[0] = b"\xff\xfe broken"
    body, length = encode_request({"text": texts}, {"text": "BYTES"})
    response = client.post(
        f"/v2/models/{STUDENT}/infer", data=body, headers={HEADER_LENGTH_HEADER: str(length)}
    )
    assert response.status_code == 400
    assert response.json is not None and "not valid UTF-8" in response.json["error"]
    status, answer = infer(
        client, [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [HOCKEY]}]
    )
    assert status == 200, answer


def test_token_tensors_are_not_a_client_input(client: FlaskClient) -> None:
    status, body = infer(
        client, [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 102]}]
    )
    assert 400 <= status < 500 and "error" in body
