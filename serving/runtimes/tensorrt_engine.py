"""Build TensorRT engines from ONNX models, cached on disk across restarts.

A Jetson (JetPack 6, TensorRT 10) builds an engine for a model version once and reuses it
until something the engine depends on changes. Engines live at::

    <cache_dir>/<model>/<version>/<key>.plan      (+ <key>.json describing the key)

where ``key`` hashes the GPU's compute capability, the TensorRT version, the sha256 of the
ONNX file, the precision flags, the batch profile and (for INT8) the calibration data. A
new GPU, a TensorRT upgrade, a changed model or other flags therefore give a new key and a
rebuild; anything else is a cache hit. Engines are written atomically (a temporary file
then :func:`os.replace`), so a crash or a second process never leaves a torn engine.

``tensorrt`` and ``cuda-python`` are imported only when needed; without them the
functions raise :class:`~shared.errors.Unsupported` saying what to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from shared.errors import InternalError, InvalidInput, Unsupported
from shared.hashing import sha256_file

log = logging.getLogger(__name__)

#: Default workspace memory TensorRT may use while building (256 MiB suits a Jetson).
DEFAULT_WORKSPACE_BYTES = 256 << 20
#: Batch size of INT8 calibration batches.
CALIBRATION_BATCH_SIZE = 32


def load_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`Unsupported` when it is not installed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise Unsupported(
            "native TensorRT needs the 'tensorrt' Python package (JetPack 6 ships it; "
            "elsewhere: pip install 'tether[tensorrt]')"
        ) from exc
    return tensorrt


def load_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings, or :class:`Unsupported` when absent."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise Unsupported(
                "native TensorRT needs cuda-python (pip install 'tether[tensorrt]')"
            ) from exc
    return runtime


def cuda_call(cudart: ModuleType, result: Any) -> Any:
    """Unpack a cuda-python ``(error, *values)`` result; :class:`InternalError` on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise InternalError(f"CUDA call failed: {_cuda_error_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _cuda_error_name(cudart: ModuleType, err: Any) -> str:
    try:
        _, name = cudart.cudaGetErrorName(err)
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return str(err)


def compute_capability(cudart: ModuleType, device: int | None = None) -> str:
    """The current (or given) GPU's compute capability, e.g. ``"8.7"`` on a Jetson Orin."""
    if device is None:
        device = int(cuda_call(cudart, cudart.cudaGetDevice()))
    attrs = cudart.cudaDeviceAttr
    major = cuda_call(
        cudart, cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMajor, device)
    )
    minor = cuda_call(
        cudart, cudart.cudaDeviceGetAttribute(attrs.cudaDevAttrComputeCapabilityMinor, device)
    )
    return f"{int(major)}.{int(minor)}"


@dataclass(frozen=True)
class EngineOptions:
    """How to build: precision flags, the batch profile and the builder's memory limit."""

    fp16: bool = True
    int8: bool = False
    max_batch_size: int = 1
    #: The batch size TensorRT tunes kernels for (default: half the maximum, at least 1).
    opt_batch_size: int | None = None
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES

    def profile(self) -> tuple[int, int, int]:
        """``(min, opt, max)`` of the dynamic batch dimension."""
        top = max(1, self.max_batch_size)
        opt = self.opt_batch_size if self.opt_batch_size is not None else max(1, top // 2)
        if not 1 <= opt <= top:
            raise InvalidInput(f"opt batch size {opt} is outside 1..{top}")
        return 1, opt, top

    @property
    def precision(self) -> str:
        """The lowest precision the engine may use: ``INT8``, ``FP16`` or ``FP32``."""
        return "INT8" if self.int8 else "FP16" if self.fp16 else "FP32"


@dataclass(frozen=True)
class EngineKey:
    """Everything a built engine depends on; its digest names the cached engine."""

    compute_capability: str
    tensorrt_version: str
    onnx_sha256: str
    fp16: bool
    int8: bool
    max_batch_size: int
    opt_batch_size: int
    #: sha256 of the INT8 calibration data (``None`` without INT8).
    calibration_sha256: str | None = None

    @property
    def digest(self) -> str:
        """A short, stable hash of the key: the engine's file stem."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24]


@dataclass(frozen=True)
class Engine:
    """A serialized engine on disk and whether it came from the cache."""

    path: Path
    key: EngineKey
    cached: bool


def engine_path(cache_dir: Path, model: str, version: str, key: EngineKey) -> Path:
    """Where the engine for ``key`` lives: ``<cache_dir>/<model>/<version>/<digest>.plan``."""
    return cache_dir / model / version / f"{key.digest}.plan"


def engine_key(
    onnx_path: Path,
    options: EngineOptions,
    *,
    calibration: np.ndarray | None = None,
    trt: ModuleType | None = None,
    cudart: ModuleType | None = None,
) -> EngineKey:
    """The cache key for building ``onnx_path`` with ``options`` on this GPU and TensorRT."""
    trt = trt or load_tensorrt()
    cudart = cudart or load_cudart()
    _, opt, top = options.profile()
    calibration_sha = None
    if options.int8:
        if calibration is None:
            raise Unsupported("INT8 engines need calibration data")
        calibration_sha = hashlib.sha256(np.ascontiguousarray(calibration).tobytes()).hexdigest()
    return EngineKey(
        compute_capability=compute_capability(cudart),
        tensorrt_version=str(trt.__version__),
        onnx_sha256=sha256_file(onnx_path),
        fp16=options.fp16,
        int8=options.int8,
        max_batch_size=top,
        opt_batch_size=opt,
        calibration_sha256=calibration_sha,
    )


def get_or_build_engine(
    onnx_path: Path,
    cache_dir: Path,
    model: str,
    version: str,
    options: EngineOptions,
    *,
    calibration: np.ndarray | None = None,
) -> Engine:
    """The cached engine for this model, GPU, TensorRT and flags; built and cached if absent."""
    trt = load_tensorrt()
    cudart = load_cudart()
    key = engine_key(onnx_path, options, calibration=calibration, trt=trt, cudart=cudart)
    path = engine_path(cache_dir, model, version, key)
    if path.is_file() and path.stat().st_size > 0:
        log.info("%s v%s: TensorRT engine cache hit %s", model, version, path)
        return Engine(path=path, key=key, cached=True)

    log.info("%s v%s: building TensorRT %s engine (%s)", model, version, key.tensorrt_version,
             options.precision)  # fmt: skip
    started = time.perf_counter()
    plan = build_engine(onnx_path.read_bytes(), options, calibration=calibration, trt=trt,
                        cudart=cudart)  # fmt: skip
    seconds = time.perf_counter() - started
    write_atomic(path, plan)
    sidecar = {
        **asdict(key),
        "digest": key.digest,
        "model": model,
        "version": version,
        "onnx_path": str(onnx_path),
        "precision": options.precision,
        "build_seconds": round(seconds, 3),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_atomic(path.with_suffix(".json"), json.dumps(sidecar, indent=2).encode())
    log.info("%s v%s: engine built in %.1f s -> %s", model, version, seconds, path)
    return Engine(path=path, key=key, cached=False)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_engine(
    onnx_bytes: bytes,
    options: EngineOptions,
    *,
    calibration: np.ndarray | None = None,
    trt: ModuleType | None = None,
    cudart: ModuleType | None = None,
) -> bytes:
    """Parse an ONNX model and build a serialized TensorRT 10 engine from it."""
    trt = trt or load_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InternalError(f"TensorRT could not parse the ONNX model: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.fp16:
        if not builder.platform_has_fast_fp16:
            log.warning("this GPU has no fast FP16; TensorRT may keep FP32 kernels")
        config.set_flag(trt.BuilderFlag.FP16)

    low, opt, top = options.profile()
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        _set_batch_shapes(profile, tensor.name, tuple(tensor.shape), (low, opt, top))
    config.add_optimization_profile(profile)

    calibrator = None
    if options.int8:
        if calibration is None:
            raise Unsupported("INT8 engines need calibration data")
        config.set_flag(trt.BuilderFlag.INT8)
        batch = min(CALIBRATION_BATCH_SIZE, top, len(calibration))
        calibration_profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            _set_batch_shapes(calibration_profile, tensor.name, tuple(tensor.shape),
                              (batch, batch, batch))  # fmt: skip
        config.set_calibration_profile(calibration_profile)
        calibrator = make_calibrator(trt, cudart or load_cudart(), calibration, batch)
        config.int8_calibrator = calibrator

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None:
        calibrator.free()
    if serialized is None:
        raise InternalError("TensorRT failed to build the engine (see the TensorRT log)")
    return bytes(serialized)


def _set_batch_shapes(
    profile: Any, name: str, shape: tuple[int, ...], batches: tuple[int, int, int]
) -> None:
    """Give ``profile`` min/opt/max shapes for an input whose only dynamic dim is the batch."""
    if any(d < 0 for d in shape[1:]):
        raise Unsupported(f"input {name!r} has dynamic dims {shape} beyond the batch dimension")
    fixed = shape[1:]
    if shape and shape[0] >= 0:  # a static batch: the profile can only say so
        profile.set_shape(name, shape, shape, shape)
        return
    low, opt, top = ((b, *fixed) for b in batches)
    profile.set_shape(name, low, opt, top)


def make_calibrator(trt: ModuleType, cudart: ModuleType, data: np.ndarray, batch: int) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``data`` (the model's single input) in batches.

    The class is defined here because its base class exists only once TensorRT is imported.
    """

    base: Any = trt.IInt8EntropyCalibrator2

    class EntropyCalibrator(base):
        """Copies successive calibration batches to one device buffer for the builder."""

        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.data = np.ascontiguousarray(data, dtype=np.float32)
            self.batch = batch
            self.index = 0
            self.cache: bytes | None = None
            nbytes = self.batch * int(np.prod(self.data.shape[1:])) * self.data.itemsize
            self.device = cuda_call(cudart, cudart.cudaMalloc(nbytes))

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self.index + self.batch > len(self.data):
                return None
            chunk = np.ascontiguousarray(self.data[self.index : self.index + self.batch])
            self.index += self.batch
            cuda_call(cudart, cudart.cudaMemcpy(
                self.device, chunk.ctypes.data, chunk.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            ))  # fmt: skip
            return [int(self.device)] * len(names)

        def read_calibration_cache(self) -> bytes | None:
            return self.cache

        def write_calibration_cache(self, cache: Any) -> None:
            self.cache = bytes(cache)

        def free(self) -> None:
            if self.device is not None:
                cuda_call(cudart, cudart.cudaFree(self.device))
                self.device = None

    return EntropyCalibrator()
