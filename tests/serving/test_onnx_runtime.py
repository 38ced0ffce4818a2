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


@pytest.mark.parametrize(
    ("model_threads", "host_threads", "used"), [(None, 1, 1), (0, 1, 0), (2, 0, 2)]
)
def test_a_models_own_thread_count_wins_over_the_hosts(
    tmp_path: Path, model_threads: int | None, host_threads: int, used: int
) -> None:
    """A big network's config asks for every core (0) while the host keeps small models on
    one thread: the session gets the model's count, else the host's."""
    path = write_model(tmp_path, "m", dense_model())
    parameters = {} if model_threads is None else {"intra_op_threads": model_threads}
    runtime = OnnxRuntime(
        "m",
        "1",
        path.parent,
        ModelConfig(name="m", parameters=parameters),
        RuntimeOptions(providers=("CPUExecutionProvider",), intra_op_threads=host_threads),
    )
    runtime.load()
    assert runtime._session is not None
    options = runtime._session.get_session_options()
    assert options.intra_op_num_threads == used
