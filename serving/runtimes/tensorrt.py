"""The native TensorRT backend (JetPack 6 / TensorRT 10), driven through cuda-python.

A model version with a ``model.plan`` is deserialized as is; one with only a
``model.onnx`` gets an engine built for this GPU, TensorRT version and precision, cached
by :mod:`serving.runtimes.tensorrt_engine` so a device builds it once. Device buffers for the
largest batch are allocated at load; a prediction copies the inputs in, runs the engine on
a CUDA stream and copies the outputs back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serving.model_config import ModelConfig
from serving.runtimes.base import Runtime, RuntimeOptions, TensorSpec, model_file, model_flops
from serving.runtimes.tensorrt_engine import (
    EngineOptions,
    cuda_call,
    get_or_build_engine,
    load_cudart,
    load_tensorrt,
)
from shared.datatypes import from_numpy_dtype
from shared.errors import InternalError, InvalidInput, Unavailable, Unsupported

log = logging.getLogger(__name__)

#: A version folder may hold INT8 calibration inputs here (``[N, ...]``, the model's input).
CALIBRATION_FILE = "calibration.npy"


class TensorRTRuntime(Runtime):
    """A model version served by a native TensorRT engine on this device's GPU."""

    platform = "tensorrt_plan"

    def __init__(
        self,
        name: str,
        version: str,
        version_dir: Path,
        config: ModelConfig,
        options: RuntimeOptions,
        *,
        calibration: np.ndarray | None = None,
    ) -> None:
        super().__init__(name, version)
        self.version_dir = version_dir
        self.config = config
        self.options = options
        self.max_batch_size = config.max_batch_size
        #: INT8 calibration inputs; default: ``<version_dir>/calibration.npy`` if present.
        self.calibration = calibration
        self.engine_path: Path | None = None
        self._trt: ModuleType | None = None
        self._cudart: ModuleType | None = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._buffers: dict[str, Any] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        trt = self._trt = load_tensorrt()
        cudart = self._cudart = load_cudart()
        plan_path, precision = self._engine_file()
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise InternalError(f"TensorRT could not deserialize {plan_path}")
        context = engine.create_execution_context()
        if context is None:
            raise InternalError(f"TensorRT could not create an execution context for {plan_path}")
        self._engine, self._context, self.engine_path = engine, context, plan_path
        self.provider = f"TensorRT {trt.__version__} ({precision})"

        self.inputs, self.outputs = [], []
        self._input_names, self._output_names = [], []
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor)))
            shape = tuple(int(d) for d in engine.get_tensor_shape(tensor))
            self._dtypes[tensor] = dtype
            spec = TensorSpec(tensor, from_numpy_dtype(dtype), shape)
            if engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
                self._input_names.append(tensor)
                if shape and shape[0] < 0:
                    top = int(engine.get_tensor_profile_shape(tensor, 0)[2][0])
                    self.max_batch_size = min(self.max_batch_size or top, top)
            else:
                self.outputs.append(spec)
                self._output_names.append(tensor)

        try:
            self._stream = cuda_call(cudart, cudart.cudaStreamCreate())
            for spec in (*self.inputs, *self.outputs):
                shape = _with_batch(spec.shape, max(1, self.max_batch_size))
                nbytes = max(1, int(np.prod(shape)) * self._dtypes[spec.name].itemsize)
                self._buffers[spec.name] = cuda_call(cudart, cudart.cudaMalloc(nbytes))
                context.set_tensor_address(spec.name, int(self._buffers[spec.name]))
        except Exception:
            self._free()
            raise
        self.flops = model_flops(
            self.version_dir / "model.onnx", self.config.parameters.get("flops")
        )
        log.info("%s v%s runs on %s (%s)", self.name, self.version, self.provider, plan_path)

    def _engine_file(self) -> tuple[Path, str]:
        """The engine to deserialize and its precision: ``model.plan``, or one built from ONNX."""
        plan = self.version_dir / "model.plan"
        if self.config.platform == "tensorrt_plan" or plan.is_file():
            declared = self.config.parameters.get("precision", "as built")
            return model_file(self.version_dir, "model.plan"), str(declared)
        onnx_path = model_file(self.version_dir, "model.onnx")
        options = EngineOptions(
            fp16=self.options.fp16,
            int8=self.options.int8,
            max_batch_size=max(1, self.config.max_batch_size),
        )
        calibration = self.calibration
        if options.int8 and calibration is None:
            calibration_path = self.version_dir / CALIBRATION_FILE
            if not calibration_path.is_file():
                raise Unsupported(
                    f"model {self.name!r}: INT8 needs calibration inputs ({calibration_path})"
                )
            calibration = np.load(calibration_path)
        cache_dir = self.options.engine_cache_dir or self.version_dir.parent.parent / ".engines"
        engine = get_or_build_engine(
            onnx_path, cache_dir, self.name, self.version, options, calibration=calibration
        )
        return engine.path, options.precision

    # -- serving ---------------------------------------------------------------------------

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        context, cudart = self._context, self._cudart
        if context is None or cudart is None:
            raise Unavailable(f"model {self.name!r} v{self.version} is not loaded")
        names = list(output_names) if output_names else list(self._output_names)
        unknown = [n for n in names if n not in self._output_names]
        if unknown:
            raise InvalidInput(f"model {self.name!r} has no output {unknown[0]!r}")
        arrays = self._inputs(inputs)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            for tensor, array in arrays.items():
                if not context.set_input_shape(tensor, array.shape):
                    raise InvalidInput(
                        f"model {self.name!r} rejects {tensor!r} shape {array.shape}"
                    )
                cuda_call(cudart, cudart.cudaMemcpyAsync(
                    self._buffers[tensor], array.ctypes.data, array.nbytes, h2d, self._stream
                ))  # fmt: skip
            results = {
                tensor: np.empty(tuple(context.get_tensor_shape(tensor)), self._dtypes[tensor])
                for tensor in names
            }
            if not context.execute_async_v3(int(self._stream)):
                raise InternalError(f"model {self.name!r} v{self.version}: TensorRT failed")
            for tensor, out in results.items():
                cuda_call(cudart, cudart.cudaMemcpyAsync(
                    out.ctypes.data, self._buffers[tensor], out.nbytes, d2h, self._stream
                ))  # fmt: skip
            cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream))
        return results

    def _inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Contiguous arrays of the engine's dtypes, checked against the batch limit."""
        arrays: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InvalidInput(f"model {self.name!r} needs input {spec.name!r}")
            array = np.ascontiguousarray(inputs[spec.name], dtype=self._dtypes[spec.name])
            if len(array.shape) != len(spec.shape):
                raise InvalidInput(
                    f"input {spec.name!r} has shape {list(array.shape)}, "
                    f"expected {list(spec.shape)}"
                )
            if spec.shape and spec.shape[0] < 0 and array.shape[0] > self.max_batch_size:
                raise InvalidInput(
                    f"batch of {array.shape[0]} is over model {self.name!r}'s maximum "
                    f"{self.max_batch_size}"
                )
            arrays[spec.name] = array
        return arrays

    # -- unloading -------------------------------------------------------------------------

    def unload(self) -> None:
        super().unload()
        with self._lock:
            self._free()

    def _free(self) -> None:
        cudart = self._cudart
        if cudart is not None:
            for pointer in self._buffers.values():
                cudart.cudaFree(pointer)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._buffers = {}
        self._stream = None
        self._context = None
        self._engine = None


def _with_batch(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    """``shape`` with a dynamic batch dimension set to ``batch`` (other dynamic dims: 1)."""
    return tuple(batch if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(shape))
