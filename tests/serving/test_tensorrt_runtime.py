"""The native TensorRT runtime, driven against fake ``tensorrt`` and ``cuda`` modules.

The fake engine computes ``softmax(pixels / 16 @ W)`` by reading the input from the "device"
buffer the runtime registered and writing the output to the output buffer, so these tests
check the runtime's real work: shapes set, inputs copied in, engine run, outputs copied out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.model_config import ModelConfig
from serving.runtimes.base import RuntimeOptions
from serving.runtimes.flops import count_flops
from serving.runtimes.tensorrt import TensorRTRuntime
from shared.errors import InvalidInput, ModelNotReady, Unavailable, Unsupported
from tests.serving.test_tensorrt_engine import STUDENT_ONNX, FakeCudart, FakeTensorRT, install_fakes

WEIGHTS = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)


def expected(pixels: np.ndarray) -> np.ndarray:
    logits = (pixels / 16.0) @ WEIGHTS
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.input_shapes: dict[str, tuple[int, ...]] = {}
        self.streams: list[int] = []

    def set_tensor_address(self, name: str, pointer: int) -> bool:
        self.addresses[name] = pointer
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, _, high = self.engine.profile
        if not low[0] <= shape[0] <= high[0]:
            return False
        self.input_shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = self.input_shapes["pixels"][0]
        return (batch, 64) if name == "pixels" else (batch, 10)

    def execute_async_v3(self, stream: int) -> bool:
        self.streams.append(stream)
        cudart = self.engine.cudart
        batch = self.input_shapes["pixels"][0]
        pixels = cudart.device_array(self.addresses["pixels"], (batch, 64))
        out = cudart.device_array(self.addresses["probabilities"], (batch, 10))
        out[:] = expected(pixels)
        return True


class FakeEngine:
    """A deserialized engine with one dynamic-batch input and one output."""

    def __init__(self, cudart: FakeCudart, plan: bytes, max_batch: int = 256) -> None:
        self.cudart = cudart
        self.plan = plan
        self.profile = ((1, 64), (max_batch // 2, 64), (max_batch, 64))
        self.tensors = [("pixels", "input", (-1, 64)), ("probabilities", "output", (-1, 10))]
        self.contexts: list[FakeContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i][0]

    def get_tensor_mode(self, name: str) -> str:
        return dict((n, m) for n, m, _ in self.tensors)[name]

    def get_tensor_dtype(self, name: str) -> str:
        return FakeTensorRT.DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return dict((n, s) for n, _, s in self.tensors)[name]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, ...], ...]:
        return self.profile

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


@pytest.fixture
def fakes(mocker: Any) -> tuple[FakeTensorRT, FakeCudart]:
    trt, cudart = install_fakes(mocker)
    trt.engine_factory = lambda plan: FakeEngine(cudart, plan)
    return trt, cudart


def _config(platform: str = "onnxruntime_onnx", **parameters: Any) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "digits-student",
            "platform": platform,
            "max_batch_size": 256,
            "input": [{"name": "pixels", "datatype": "FP32", "dims": [64]}],
            "output": [{"name": "probabilities", "datatype": "FP32", "dims": [10]}],
            "parameters": parameters,
        }
    )


@pytest.fixture
def onnx_version(tmp_path: Path) -> Path:
    version_dir = tmp_path / "repo" / "digits-student" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(STUDENT_ONNX.read_bytes())
    return version_dir


def _runtime(version_dir: Path, config: ModelConfig, **options: Any) -> TensorRTRuntime:
    opts = RuntimeOptions(engine_cache_dir=version_dir.parents[2] / "engines", **options)
    return TensorRTRuntime("digits-student", "1", version_dir, config, opts)


def test_loads_a_plan_file_and_predicts(
    fakes: tuple[FakeTensorRT, FakeCudart], tmp_path: Path
) -> None:
    trt, cudart = fakes
    version_dir = tmp_path / "digits-student" / "1"
    version_dir.mkdir(parents=True)
    (version_dir / "model.plan").write_bytes(b"serialized engine")
    runtime = _runtime(version_dir, _config("tensorrt_plan", precision="FP16"))
    runtime.load()

    assert trt.deserialized == b"serialized engine"
    assert trt.builds == []  # a plan is used as is
    assert runtime.provider == "TensorRT 10.3.0 (FP16)"
    assert runtime.platform == "tensorrt_plan"
    assert [(s.name, s.datatype, s.shape) for s in runtime.inputs] == [("pixels", "FP32", (-1, 64))]
    assert [(s.name, s.datatype, s.shape) for s in runtime.outputs] == [
        ("probabilities", "FP32", (-1, 10))
    ]
    assert runtime.max_batch_size == 256

    pixels = np.random.default_rng(1).uniform(0, 16, size=(5, 64)).astype(np.float32)
    cudart.copies.clear()
    out = runtime.predict({"pixels": pixels})
    assert list(out) == ["probabilities"]
    np.testing.assert_allclose(out["probabilities"], expected(pixels), rtol=1e-6)
    context = runtime._context
    assert context.input_shapes == {"pixels": (5, 64)}
    assert context.streams == [77]
    # One host-to-device copy of the whole input, one device-to-host copy of the output.
    assert cudart.copies == [
        ("H2D", context.addresses["pixels"], pixels.nbytes),
        ("D2H", int(out["probabilities"].ctypes.data), 5 * 10 * 4),
    ]


def test_builds_and_caches_an_engine_from_onnx(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    trt, _ = fakes
    runtime = _runtime(onnx_version, _config())
    runtime.load()
    assert runtime.provider == "TensorRT 10.3.0 (FP16)"
    assert runtime.engine_path is not None
    cache = onnx_version.parents[2] / "engines" / "digits-student" / "1"
    assert runtime.engine_path.parent == cache
    assert trt.deserialized == runtime.engine_path.read_bytes()
    assert runtime.flops == count_flops(onnx_version / "model.onnx")
    config = trt.builds[0]["config"]
    assert config.flags == {"FP16"}
    assert config.profiles[0].shapes["pixels"] == ((1, 64), (128, 64), (256, 64))

    again = _runtime(onnx_version, _config())
    again.load()
    assert len(trt.builds) == 1  # the second load reuses the cached engine
    assert again.engine_path == runtime.engine_path


def test_fp32_when_fp16_is_off(fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path) -> None:
    runtime = _runtime(onnx_version, _config(), fp16=False)
    runtime.load()
    assert runtime.provider == "TensorRT 10.3.0 (FP32)"


def test_int8_needs_calibration_inputs(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    runtime = _runtime(onnx_version, _config(), int8=True)
    with pytest.raises(Unsupported, match="calibration"):
        runtime.load()


def test_int8_uses_calibration_npy(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    trt, _ = fakes
    data = np.random.default_rng(2).uniform(0, 16, size=(64, 64)).astype(np.float32)
    np.save(onnx_version / "calibration.npy", data)
    runtime = _runtime(onnx_version, _config(), int8=True)
    runtime.load()
    assert runtime.provider == "TensorRT 10.3.0 (INT8)"
    assert trt.builds[0]["config"].flags == {"FP16", "INT8"}
    np.testing.assert_array_equal(np.concatenate(trt.calibration_batches), data)


def test_warm_up_and_infer_through_the_base_class(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    runtime = _runtime(onnx_version, _config())
    runtime.load()
    with pytest.raises(ModelNotReady):
        runtime.infer({"pixels": np.zeros((1, 64), np.float32)})
    runtime.warm_up((1, 8))
    runtime.mark_ready()
    pixels = np.full((3, 64), 4.0, np.float32)
    prediction = runtime.infer({"pixels": pixels})
    assert prediction.served_by == "edge"
    np.testing.assert_allclose(prediction.outputs["probabilities"], expected(pixels), rtol=1e-6)
    meta = runtime.metadata()
    assert meta["platform"] == "tensorrt_plan"
    assert meta["parameters"]["execution_provider"] == "TensorRT 10.3.0 (FP16)"


def test_inputs_are_cast_and_checked(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    runtime = _runtime(onnx_version, _config())
    runtime.load()
    pixels = np.arange(2 * 64, dtype=np.float64).reshape(2, 64) % 17  # cast to FP32
    out = runtime.predict({"pixels": pixels}, ["probabilities"])
    np.testing.assert_allclose(out["probabilities"], expected(pixels.astype(np.float32)), rtol=1e-6)
    with pytest.raises(InvalidInput, match="over"):
        runtime.predict({"pixels": np.zeros((257, 64), np.float32)})
    with pytest.raises(InvalidInput, match="needs input"):
        runtime.predict({"image": np.zeros((1, 64), np.float32)})
    with pytest.raises(InvalidInput, match="no output"):
        runtime.predict({"pixels": np.zeros((1, 64), np.float32)}, ["logits"])
    with pytest.raises(InvalidInput, match="shape"):
        runtime.predict({"pixels": np.zeros((64,), np.float32)})


def test_unload_frees_device_memory(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    _, cudart = fakes
    runtime = _runtime(onnx_version, _config())
    runtime.load()
    runtime.mark_ready()
    buffers = dict(runtime._buffers)
    # Buffers hold the largest batch: 256 x 64 inputs and 256 x 10 outputs, float32.
    assert {n: cudart.allocations[p].nbytes for n, p in buffers.items()} == {
        "pixels": 256 * 64 * 4,
        "probabilities": 256 * 10 * 4,
    }
    runtime.unload()
    assert not runtime.ready
    assert sorted(cudart.freed) == sorted(buffers.values())
    assert cudart.streams_destroyed == 1
    with pytest.raises(Unavailable, match="not loaded"):
        runtime.predict({"pixels": np.zeros((1, 64), np.float32)})


def test_without_tensorrt_load_is_unsupported(mocker: Any, onnx_version: Path) -> None:
    import sys

    mocker.patch.dict(sys.modules, {"tensorrt": None})
    runtime = _runtime(onnx_version, _config())
    with pytest.raises(Unsupported, match="tensorrt"):
        runtime.load()


def test_engine_cache_sidecar_describes_the_key(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_version: Path
) -> None:
    runtime = _runtime(onnx_version, _config())
    runtime.load()
    assert runtime.engine_path is not None
    sidecar = json.loads(runtime.engine_path.with_suffix(".json").read_text())
    assert sidecar["model"] == "digits-student" and sidecar["version"] == "1"
    assert sidecar["compute_capability"] == "8.7"
