"""``/v1/chat/completions`` and ``/v1/completions`` through the official client against a
real agent, compared with llama.cpp run directly on the same GGUF file."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from harness.agent_process import AgentProcess
from tests.openai.conftest import http, text_model_dir

MESSAGES = [{"role": "user", "content": "Name three colours."}]
#: Small, so the suite stays quick on a loaded 2-core machine; enough to compare texts.
MAX_TOKENS = 8
SEED = 7


@pytest.fixture(scope="module")
def engine() -> Any:
    """llama.cpp itself, on the same file and context as the agent."""
    from llama_cpp import Llama

    path = text_model_dir("smollm2-135m") / "1" / "model.gguf"
    return Llama(model_path=str(path), n_ctx=2048, verbose=False)


@pytest.fixture(scope="module")
def direct_chat(engine: Any) -> dict[str, Any]:
    engine.reset()
    answer: dict[str, Any] = engine.create_chat_completion(
        messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
    )
    return answer


def test_chat_greedy_gives_the_engines_text_and_usage(
    client: Any, direct_chat: dict[str, Any]
) -> None:
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
    )
    expected = direct_chat["choices"][0]["message"]["content"]
    assert expected  # the engine said something
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == direct_chat["choices"][0]["finish_reason"]
    assert answer.usage.prompt_tokens == direct_chat["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == direct_chat["usage"]["completion_tokens"]
    assert answer.usage.total_tokens == direct_chat["usage"]["total_tokens"]
    assert answer.model_extra["served_by"] == "edge"
    assert answer.model_extra["route"] == "local"


def test_chat_stream_gives_the_same_text_and_a_usage_chunk(
    client: Any, direct_chat: dict[str, Any]
) -> None:
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=MESSAGES,
        max_completion_tokens=MAX_TOKENS,
        temperature=0,
        seed=SEED,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct_chat["choices"][0]["message"]["content"]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == direct_chat["choices"][0]["finish_reason"]
    assert all(f is None for f in finishes[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices
    assert usage.prompt_tokens == direct_chat["usage"]["prompt_tokens"]
    assert usage.completion_tokens == direct_chat["usage"]["completion_tokens"]


def test_completion_gives_the_engines_text(client: Any, engine: Any) -> None:
    prompt = "The three primary colours are"
    engine.reset()
    direct = engine.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0, seed=SEED)
    answer = client.completions.create(
        model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
    )
    assert answer.choices[0].text == direct["choices"][0]["text"]
    assert answer.usage.prompt_tokens == direct["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == direct["usage"]["completion_tokens"]


def test_unknown_model_is_404(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"


def test_prompt_over_the_context_is_400(client: Any) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2-135m", messages=long, max_tokens=4)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "2048" in caught.value.body["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_bad_parameters_are_400_in_openai_shape(
    edge: AgentProcess, change: dict[str, Any], param: str
) -> None:
    body = {"model": "smollm2-135m", "messages": MESSAGES, "max_tokens": 2, **change}
    status, _, answer = http(edge.url + "/v1/chat/completions", body)
    assert status == 400
    assert answer["error"]["param"] == param
    assert answer["error"]["type"] == "invalid_request_error"


def test_a_language_model_refuses_v2_tensors(edge: AgentProcess) -> None:
    status, _, answer = http(
        edge.url + "/v2/models/smollm2-135m/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
    )
    assert status == 400
    assert "error" in answer
