"""The ONNX Runtime backend's execution-provider chain (GPU providers mocked: no GPU here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from pytest_mock import MockerFixture

from harness.onnx_models import dense_model, write_model
from serving.model_config import ModelConfig
from serving.runtimes.base import RuntimeOptions
from serving.runtimes.onnx import OnnxRuntime
from shared.errors import Unavailable


def _runtime(tmp_path: Path, providers: tuple[str, ...]) -> OnnxRuntime:
    path = write_model(tmp_path, "m", dense_model())
    return OnnxRuntime(
        "m", "1", path.parent, ModelConfig(name="m"), RuntimeOptions(providers=providers)
    )


def test_first_working_provider_wins_and_is_reported(tmp_path: Path, mocker: MockerFixture) -> None:
    mocker.patch.object(
        ort,
        "get_available_providers",
        return_value=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    real = ort.InferenceSession
    tried: list[str] = []

    def session(path: str, sess_options: Any = None, providers: Any = None) -> Any:
        name, options = providers[0]
        tried.append(name)
        if name == "TensorrtExecutionProvider":
            assert options["trt_fp16_enable"] is True
            raise RuntimeError("libnvinfer.so.10: cannot open shared object file")
        if name == "CUDAExecutionProvider":
            raise RuntimeError("CUDA driver version is insufficient")
        return real(path, sess_options=sess_options, providers=[name])

    mocker.patch.object(ort, "InferenceSession", side_effect=session)
    runtime = _runtime(
        tmp_path, ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    )
    runtime.load()
    assert tried == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert runtime.provider == "CPUExecutionProvider"
    assert runtime.metadata()["parameters"]["execution_provider"] == "CPUExecutionProvider"


def test_no_working_provider_names_every_reason(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, ("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    with pytest.raises(Unavailable) as info:
        runtime.load()
    assert "TensorrtExecutionProvider: not in this onnxruntime build" in info.value.message
    assert "CUDAExecutionProvider: not in this onnxruntime build" in info.value.message
