"""TensorRT engine building and caching, against fake ``tensorrt`` and ``cuda`` modules.

Neither TensorRT nor CUDA exists on CI machines, so this module provides small fakes that
behave like the TensorRT 10 and cuda-python APIs the engine code calls: "device memory" is
ordinary host memory, so copies and the fake engine's arithmetic are real.
``tests/serving/test_tensorrt_runtime.py`` reuses them.
"""

from __future__ import annotations

import ctypes
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.runtimes import tensorrt_engine
from serving.runtimes.tensorrt_engine import (
    EngineOptions,
    build_engine,
    get_or_build_engine,
    load_cudart,
    load_tensorrt,
    write_atomic,
)
from shared.errors import InternalError, Unsupported
from shared.hashing import sha256_file

STUDENT_ONNX = Path(__file__).resolve().parents[2] / "models/repository/digits-student/1/model.onnx"

# -- fake cuda-python -------------------------------------------------------------------------


class FakeCudart(types.ModuleType):
    """cuda-python's runtime module: (error, *values) results, host memory as "device"."""

    class cudaError_t:
        cudaSuccess = 0
        cudaErrorMemoryAllocation = 2

    class cudaDeviceAttr:
        cudaDevAttrComputeCapabilityMajor = "major"
        cudaDevAttrComputeCapabilityMinor = "minor"

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = "H2D"
        cudaMemcpyDeviceToHost = "D2H"

    def __init__(self, capability: tuple[int, int] = (8, 7)) -> None:
        super().__init__("cuda.bindings.runtime")
        self.capability = capability
        self.allocations: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.copies: list[tuple[str, int, int]] = []
        self.streams_destroyed = 0
        self.fail_malloc = False

    def cudaGetDevice(self) -> tuple[int, int]:
        return 0, 0

    def cudaDeviceGetAttribute(self, attr: str, device: int) -> tuple[int, int]:
        return 0, self.capability[0] if attr == "major" else self.capability[1]

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return 0, b"cudaErrorMemoryAllocation"

    def cudaMalloc(self, nbytes: int) -> tuple[int, int]:
        if self.fail_malloc:
            return self.cudaError_t.cudaErrorMemoryAllocation, 0
        block = np.zeros(nbytes, dtype=np.uint8)
        self.allocations[block.ctypes.data] = block
        return 0, block.ctypes.data

    def cudaFree(self, pointer: int) -> tuple[int]:
        self.freed.append(int(pointer))
        return (0,)

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: str) -> tuple[int]:
        self.copies.append((kind, int(dst), count))
        ctypes.memmove(int(dst), int(src), count)
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: str, stream: Any) -> tuple[int]:
        return self.cudaMemcpy(dst, src, count, kind)

    def cudaStreamCreate(self) -> tuple[int, int]:
        return 0, 77

    def cudaStreamSynchronize(self, stream: int) -> tuple[int]:
        return (0,)

    def cudaStreamDestroy(self, stream: int) -> tuple[int]:
        self.streams_destroyed += 1
        return (0,)

    def device_array(self, pointer: int, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 view of fake device memory (what a kernel would read or write)."""
        count = int(np.prod(shape))
        buf = (ctypes.c_float * count).from_address(int(pointer))
        return np.ctypeslib.as_array(buf).reshape(shape)


# -- fake TensorRT ----------------------------------------------------------------------------


@dataclass
class FakeTensor:
    name: str
    shape: tuple[int, ...]


@dataclass
class FakeNetwork:
    inputs: list[FakeTensor] = field(default_factory=lambda: [FakeTensor("pixels", (-1, 64))])

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]


@dataclass
class FakeProfile:
    shapes: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


@dataclass
class FakeBuilderConfig:
    flags: set[str] = field(default_factory=set)
    pools: dict[str, int] = field(default_factory=dict)
    profiles: list[FakeProfile] = field(default_factory=list)
    calibration_profile: FakeProfile | None = None
    int8_calibrator: Any = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_calibration_profile(self, profile: FakeProfile) -> bool:
        self.calibration_profile = profile
        return True


class FakeTensorRT(types.ModuleType):
    """The slice of the TensorRT 10 Python API that Tether uses."""

    class Logger:
        WARNING = "warning"

        def __init__(self, severity: str = "warning") -> None:
            self.severity = severity

    class BuilderFlag:
        FP16 = "FP16"
        INT8 = "INT8"

    class MemoryPoolType:
        WORKSPACE = "WORKSPACE"

    class DataType:
        FLOAT = "float32"
        HALF = "float16"
        INT32 = "int32"

    class TensorIOMode:
        INPUT = "input"
        OUTPUT = "output"

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            self.base_initialised = True

    def __init__(self, version: str = "10.3.0") -> None:
        super().__init__("tensorrt")
        self.__version__ = version
        self.builds: list[dict[str, Any]] = []
        self.network = FakeNetwork()
        self.parse_ok = True
        self.build_result: bytes | None = None
        self.calibration_batches: list[np.ndarray] = []
        self.engine_factory: Any = None
        self.network_flags: int | None = None
        self.parsed = b""
        self.deserialized = b""
        fake = self

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> FakeNetwork:
                fake.network_flags = flags
                return fake.network

            def create_builder_config(self) -> FakeBuilderConfig:
                return FakeBuilderConfig()

            def create_optimization_profile(self) -> FakeProfile:
                return FakeProfile()

            def build_serialized_network(self, network: Any, config: FakeBuilderConfig) -> Any:
                fake.builds.append({"config": config, "network": network})
                calibrator = config.int8_calibrator
                if calibrator is not None:  # what TensorRT does: pull batches until None
                    size = calibrator.get_batch_size()
                    while (pointers := calibrator.get_batch(["pixels"])) is not None:
                        batch = fake.cudart.device_array(pointers[0], (size, 64)).copy()
                        fake.calibration_batches.append(batch)
                    calibrator.write_calibration_cache(b"calibration table")
                if fake.build_result is not None:
                    return fake.build_result if fake.build_result != b"" else None
                return f"PLAN {sorted(config.flags)} #{len(fake.builds)}".encode()

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: Any, logger: Any) -> None:
                self.network = network

            def parse(self, data: bytes) -> bool:
                fake.parsed = data
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "node 3: unsupported op FancyOp"

        class Runtime:
            def __init__(self, logger: Any) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, plan: bytes) -> Any:
                fake.deserialized = plan
                return fake.engine_factory(plan) if fake.engine_factory else None

        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.Runtime = Runtime
        self.cudart = FakeCudart()

    @staticmethod
    def nptype(dtype: str) -> type:
        return np.dtype(dtype).type


def install_fakes(
    mocker: Any, trt: FakeTensorRT | None = None, cudart: FakeCudart | None = None
) -> tuple[FakeTensorRT, FakeCudart]:
    """Make ``import tensorrt`` and ``from cuda.bindings import runtime`` find the fakes."""
    trt = trt or FakeTensorRT()
    cudart = cudart or trt.cudart
    trt.cudart = cudart
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart  # type: ignore[attr-defined]
    cuda.bindings = bindings  # type: ignore[attr-defined]
    mocker.patch.dict(
        sys.modules,
        {"tensorrt": trt, "cuda": cuda, "cuda.bindings": bindings, "cuda.bindings.runtime": cudart},
    )
    return trt, cudart


@pytest.fixture
def fakes(mocker: Any) -> tuple[FakeTensorRT, FakeCudart]:
    return install_fakes(mocker)


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(STUDENT_ONNX.read_bytes())
    return path


# -- imports ----------------------------------------------------------------------------------


def test_missing_tensorrt_is_unsupported(mocker: Any) -> None:
    mocker.patch.dict(sys.modules, {"tensorrt": None})
    with pytest.raises(Unsupported, match="tensorrt"):
        load_tensorrt()


def test_missing_cuda_python_is_unsupported(mocker: Any) -> None:
    mocker.patch.dict(
        sys.modules, {"cuda": None, "cuda.bindings": None, "cuda.bindings.runtime": None}
    )
    with pytest.raises(Unsupported, match="cuda-python"):
        load_cudart()


def test_old_cuda_python_layout_is_used_as_a_fallback(mocker: Any) -> None:
    cudart = FakeCudart()
    cuda = types.ModuleType("cuda")
    cuda.cudart = cudart  # type: ignore[attr-defined]
    mocker.patch.dict(
        sys.modules,
        {"cuda": cuda, "cuda.bindings": None, "cuda.cudart": cudart},
    )
    assert load_cudart() is cudart


# -- building ---------------------------------------------------------------------------------


def test_builds_an_fp16_engine_with_a_batch_profile(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, _ = fakes
    options = EngineOptions(fp16=True, max_batch_size=256, workspace_bytes=1 << 26)
    engine = get_or_build_engine(onnx_file, tmp_path / "cache", "digits", "1", options)

    assert engine.cached is False
    assert engine.path.parent == tmp_path / "cache" / "digits" / "1"
    assert engine.path.name == f"{engine.key.digest}.plan"
    assert engine.path.read_bytes() == b"PLAN ['FP16'] #1"
    assert trt.parsed == onnx_file.read_bytes()
    assert trt.network_flags == 0  # explicit batch is implicit in TensorRT 10
    (build,) = trt.builds
    config = build["config"]
    assert config.flags == {"FP16"}
    assert config.pools == {"WORKSPACE": 1 << 26}
    (profile,) = config.profiles
    assert profile.shapes == {"pixels": ((1, 64), (128, 64), (256, 64))}
    assert config.int8_calibrator is None

    sidecar = json.loads(engine.path.with_suffix(".json").read_text())
    assert sidecar["compute_capability"] == "8.7"
    assert sidecar["tensorrt_version"] == "10.3.0"
    assert sidecar["onnx_sha256"] == sha256_file(onnx_file)
    assert sidecar["fp16"] is True and sidecar["int8"] is False
    assert sidecar["max_batch_size"] == 256
    assert sidecar["digest"] == engine.key.digest
    assert sidecar["precision"] == "FP16"


def test_fp32_engine_sets_no_precision_flag(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, _ = fakes
    options = EngineOptions(fp16=False, max_batch_size=8, opt_batch_size=2)
    get_or_build_engine(onnx_file, tmp_path, "m", "1", options)
    config = trt.builds[0]["config"]
    assert config.flags == set()
    assert config.profiles[0].shapes["pixels"] == ((1, 64), (2, 64), (8, 64))


def test_second_request_is_a_cache_hit(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, _ = fakes
    options = EngineOptions(max_batch_size=64)
    first = get_or_build_engine(onnx_file, tmp_path, "m", "1", options)
    second = get_or_build_engine(onnx_file, tmp_path, "m", "1", options)
    assert second.cached is True
    assert second.path == first.path
    assert len(trt.builds) == 1


def _change_capability(trt: FakeTensorRT, cudart: FakeCudart, onnx: Path) -> EngineOptions:
    cudart.capability = (7, 2)  # a Xavier instead of an Orin
    return EngineOptions(max_batch_size=64)


def _change_tensorrt(trt: FakeTensorRT, cudart: FakeCudart, onnx: Path) -> EngineOptions:
    trt.__version__ = "10.4.0"
    return EngineOptions(max_batch_size=64)


def _change_onnx(trt: FakeTensorRT, cudart: FakeCudart, onnx: Path) -> EngineOptions:
    onnx.write_bytes(onnx.read_bytes() + b" ")
    return EngineOptions(max_batch_size=64)


def _change_fp16(trt: FakeTensorRT, cudart: FakeCudart, onnx: Path) -> EngineOptions:
    return EngineOptions(fp16=False, max_batch_size=64)


def _change_max_batch(trt: FakeTensorRT, cudart: FakeCudart, onnx: Path) -> EngineOptions:
    return EngineOptions(max_batch_size=128)


@pytest.mark.parametrize(
    "change",
    [_change_capability, _change_tensorrt, _change_onnx, _change_fp16, _change_max_batch],
    ids=["compute-capability", "tensorrt-version", "onnx-file", "fp16", "max-batch"],
)
def test_each_key_component_forces_a_rebuild(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path, change: Any
) -> None:
    trt, cudart = fakes
    first = get_or_build_engine(onnx_file, tmp_path, "m", "1", EngineOptions(max_batch_size=64))
    options = change(trt, cudart, onnx_file)
    second = get_or_build_engine(onnx_file, tmp_path, "m", "1", options)
    assert second.cached is False
    assert second.path != first.path
    assert len(trt.builds) == 2
    assert first.path.is_file() and second.path.is_file()  # the old engine stays valid


def test_int8_engine_is_calibrated_from_the_given_arrays(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, cudart = fakes
    data = np.arange(100 * 64, dtype=np.float32).reshape(100, 64) % 17
    options = EngineOptions(fp16=True, int8=True, max_batch_size=256)
    engine = get_or_build_engine(onnx_file, tmp_path, "m", "1", options, calibration=data)

    config = trt.builds[0]["config"]
    assert config.flags == {"FP16", "INT8"}
    calibrator: Any = config.int8_calibrator
    assert trt.IInt8EntropyCalibrator2 in type(calibrator).__mro__
    assert calibrator.base_initialised
    assert calibrator.get_batch_size() == 32
    assert config.calibration_profile.shapes == {"pixels": ((32, 64), (32, 64), (32, 64))}
    # Three whole batches of 32 reach the "device"; the last 4 rows do not fill one.
    assert len(trt.calibration_batches) == 3
    np.testing.assert_array_equal(np.concatenate(trt.calibration_batches), data[:96])
    assert calibrator.read_calibration_cache() == b"calibration table"
    assert calibrator.device is None and len(cudart.freed) == 1  # its buffer is released
    assert engine.key.int8 and engine.key.calibration_sha256 is not None

    other = data.copy()
    other[0, 0] += 1
    again = get_or_build_engine(onnx_file, tmp_path, "m", "1", options, calibration=other)
    assert again.cached is False  # new calibration data, new scales


def test_int8_without_calibration_data_is_unsupported(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(Unsupported, match="calibration"):
        get_or_build_engine(onnx_file, tmp_path, "m", "1", EngineOptions(int8=True))


def test_parse_errors_are_reported(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, _ = fakes
    trt.parse_ok = False
    with pytest.raises(InternalError, match="FancyOp"):
        get_or_build_engine(onnx_file, tmp_path, "m", "1", EngineOptions())
    assert not list(tmp_path.rglob("*.plan"))


def test_a_failed_build_writes_nothing(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path
) -> None:
    trt, _ = fakes
    trt.build_result = b""  # build_serialized_network returned None
    with pytest.raises(InternalError, match="failed to build"):
        get_or_build_engine(onnx_file, tmp_path / "cache", "m", "1", EngineOptions())
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*"))


def test_dynamic_dims_beyond_the_batch_are_unsupported(fakes: tuple[FakeTensorRT, Any]) -> None:
    trt, _ = fakes
    trt.network = FakeNetwork([FakeTensor("image", (-1, 3, -1, -1))])
    with pytest.raises(Unsupported, match="beyond the batch"):
        build_engine(b"onnx", EngineOptions())


def test_static_batch_inputs_get_a_fixed_profile(fakes: tuple[FakeTensorRT, Any]) -> None:
    trt, _ = fakes
    trt.network = FakeNetwork([FakeTensor("x", (4, 64))])
    build_engine(b"onnx", EngineOptions(max_batch_size=16))
    assert trt.builds[0]["config"].profiles[0].shapes == {"x": ((4, 64), (4, 64), (4, 64))}


def test_bad_opt_batch_is_refused() -> None:
    with pytest.raises(Exception, match="outside"):
        EngineOptions(max_batch_size=4, opt_batch_size=8).profile()


# -- atomic writes ----------------------------------------------------------------------------


def test_write_atomic_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "a" / "engine.plan"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["engine.plan"]


def test_write_atomic_keeps_the_old_file_when_interrupted(tmp_path: Path, mocker: Any) -> None:
    target = tmp_path / "engine.plan"
    target.write_bytes(b"old engine")
    mocker.patch.object(tensorrt_engine.os, "replace", side_effect=OSError("disk full"))
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new engine")
    assert target.read_bytes() == b"old engine"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]  # no temp file left


def test_engine_written_through_a_temp_file_and_os_replace(
    fakes: tuple[FakeTensorRT, FakeCudart], onnx_file: Path, tmp_path: Path, mocker: Any
) -> None:
    spy = mocker.spy(tensorrt_engine.os, "replace")
    engine = get_or_build_engine(onnx_file, tmp_path, "m", "1", EngineOptions())
    targets = [Path(call.args[1]) for call in spy.call_args_list]
    assert targets == [engine.path, engine.path.with_suffix(".json")]
    sources = [Path(call.args[0]) for call in spy.call_args_list]
    assert all(s.parent == engine.path.parent and s.name.endswith(".tmp") for s in sources)


def test_cuda_errors_are_internal_errors(fakes: tuple[FakeTensorRT, FakeCudart]) -> None:
    _, cudart = fakes
    cudart.fail_malloc = True
    with pytest.raises(InternalError, match="cudaErrorMemoryAllocation"):
        tensorrt_engine.cuda_call(cudart, cudart.cudaMalloc(16))
