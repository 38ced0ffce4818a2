"""The llama.cpp runtime on a GPU build (Jetson: llama-cpp-python built with GGML_CUDA).

No GPU here: the build's answer to "can you offload?" is mocked (pytest-mock), and the
engine is the real one, so what it is asked to load is what a Jetson would load.
"""

from __future__ import annotations

from typing import Any

import pytest
from pytest_mock import MockerFixture

from serving.model_config import load_model_config
from serving.runtime_options import RuntimeOptions
from serving.runtimes.llama import LlamaRuntime
from tests.openai.conftest import text_model_dir


def runtime(parameters: dict[str, Any] | None = None) -> LlamaRuntime:
    folder = text_model_dir("smollm2-135m")
    config = load_model_config(folder)
    if parameters:
        config.parameters.update(parameters)
    return LlamaRuntime("smollm2-135m", "1", folder / "1", config, RuntimeOptions())


@pytest.mark.parametrize(
    ("gpu_build", "parameters", "layers", "provider"),
    [
        (True, None, -1, "llama.cpp (GPU)"),  # a CUDA build offloads every layer
        (False, None, 0, "llama.cpp"),  # a CPU build keeps them
        (True, {"gpu_layers": 10}, 10, "llama.cpp (GPU)"),  # the config says how many
        (True, {"gpu_layers": 0}, 0, "llama.cpp"),  # or none (a GPU kept for images)
    ],
)
def test_layers_go_to_the_gpu_where_the_build_can_take_them(
    mocker: MockerFixture,
    gpu_build: bool,
    parameters: dict[str, Any] | None,
    layers: int,
    provider: str,
) -> None:
    mocker.patch("llama_cpp.llama_supports_gpu_offload", return_value=gpu_build)
    engine = mocker.patch("serving.runtimes.llama_engine.CountingLlama")
    model = runtime(parameters)
    model.load()
    assert engine.call_args.kwargs["n_gpu_layers"] == layers
    assert engine.call_args.kwargs["n_ctx"] == 2048
    assert model.provider == provider
