"""``parameters.reuse_prefix`` of a GGUF model: whether a request's prompt is evaluated from an
empty context (the default, exact) or after the previous prompt's common prefix (as
llama.cpp's own server does, sooner to the first token). Real engine, real model file."""

from __future__ import annotations

from typing import Any

import pytest
from pytest_mock import MockerFixture

from serving.model_config import load_model_config
from serving.runtime_options import RuntimeOptions
from serving.runtimes.generation import ChatMessage, GenerationRequest, TextDelta
from serving.runtimes.llama import LlamaRuntime
from serving.runtimes.llama_engine import CountingLlama
from tests.openai.conftest import text_model_dir

SYSTEM = ChatMessage("system", "You are a terse assistant for lighthouse keepers. " * 4)


def ask(model: LlamaRuntime, question: str) -> str:
    request = GenerationRequest(
        messages=(SYSTEM, ChatMessage("user", question)), max_tokens=4, temperature=0
    )
    return "".join(e.text for e in model.generate(request) if isinstance(e, TextDelta))


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_the_shared_prompt_prefix_is_evaluated_again_only_without_reuse(
    mocker: MockerFixture, reuse_prefix: bool
) -> None:
    folder = text_model_dir("smollm2-135m")
    config = load_model_config(folder)
    config.parameters["reuse_prefix"] = reuse_prefix
    model = LlamaRuntime("smollm2-135m", "1", folder / "1", config, RuntimeOptions())
    model.load()
    evaluated: list[int] = []
    real_eval = CountingLlama.eval

    def counting_eval(self: Any, tokens: Any) -> None:
        evaluated.append(len(tokens))
        real_eval(self, tokens)

    mocker.patch.object(CountingLlama, "eval", counting_eval)
    ask(model, "When is the lamp lit?")
    first = evaluated[0]  # the whole first prompt, in one batch
    evaluated.clear()
    second = model.count_prompt_tokens(
        GenerationRequest(messages=(SYSTEM, ChatMessage("user", "Who trims the wick?")))
    )
    assert ask(model, "Who trims the wick?")
    if reuse_prefix:  # only the part after the shared system prompt is evaluated
        assert evaluated[0] < second - 40, (evaluated, second, first)
    else:  # every prompt token again, from an empty context
        assert evaluated[0] == second, (evaluated, second, first)
    model.unload()
