"""ONNX Runtime backend with an execution-provider chain.

The providers are tried in the configured order (TensorRT EP, CUDA EP, CPU EP by
default); the first one with which a session can actually be created wins, and is what
model metadata and metrics report.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.model_config import ModelConfig
from serving.runtimes.base import Runtime, RuntimeOptions, TensorSpec, model_file, model_flops
from shared.datatypes import ONNX_TO_V2
from shared.errors import InternalError, InvalidInput, Unavailable

log = logging.getLogger(__name__)


class OnnxRuntime(Runtime):
    """A model version served by ONNX Runtime."""

    platform = "onnxruntime_onnx"

    def __init__(
        self,
        name: str,
        version: str,
        version_dir: Path,
        config: ModelConfig,
        options: RuntimeOptions,
    ) -> None:
        super().__init__(name, version)
        self.path = model_file(version_dir, "model.onnx")
        self.config = config
        self.options = options
        self.max_batch_size = config.max_batch_size
        self._session: ort.InferenceSession | None = None
        self._output_names: list[str] = []

    def load(self) -> None:
        self._session, self.provider = self._create_session()
        self.inputs = [_spec(arg, self.config) for arg in self._session.get_inputs()]
        self.outputs = [_spec(arg, self.config) for arg in self._session.get_outputs()]
        self._output_names = [spec.name for spec in self.outputs]
        self.flops = model_flops(self.path, self.config.parameters.get("flops"))

    def _create_session(self) -> tuple[ort.InferenceSession, str]:
        available = set(ort.get_available_providers())
        errors: list[str] = []
        for provider in self.options.providers:
            if provider not in available:
                errors.append(f"{provider}: not in this onnxruntime build")
                continue
            try:
                session = ort.InferenceSession(
                    str(self.path),
                    sess_options=self._session_options(),
                    providers=[(provider, self._provider_options(provider))],
                )
            except Exception as exc:
                errors.append(f"{provider}: {exc}")
                continue
            chosen = session.get_providers()[0]
            if chosen != provider:
                errors.append(f"{provider}: session fell back to {chosen}")
                continue
            log.info("%s v%s runs on %s", self.name, self.version, provider)
            return session, provider
        raise Unavailable(
            f"model {self.name!r} v{self.version}: no execution provider works: "
            + "; ".join(errors)
        )

    def _session_options(self) -> ort.SessionOptions:
        opts = ort.SessionOptions()
        # A model's own ``parameters.intra_op_threads`` (as Triton's per-model thread count)
        # wins over the host's ``runtime.intra_op_threads``: 0 means all cores.
        threads = self.config.parameters.get("intra_op_threads", self.options.intra_op_threads)
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = self.options.inter_op_threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        return opts

    def _provider_options(self, provider: str) -> dict[str, Any]:
        if provider == "TensorrtExecutionProvider":
            cache = self.options.engine_cache_dir
            opts: dict[str, Any] = {
                "trt_fp16_enable": self.options.fp16,
                "trt_int8_enable": self.options.int8,
            }
            if cache is not None:
                opts.update(
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path=str(cache / "ort-trt" / self.name / self.version),
                    trt_timing_cache_enable=True,
                )
            return opts
        return {}

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise Unavailable(f"model {self.name!r} v{self.version} is not loaded")
        names = list(output_names) if output_names else self._output_names
        try:
            results = session.run(names, dict(inputs))
        except ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise InvalidInput(f"model {self.name!r} rejected the input: {exc}") from None
        except Exception as exc:
            raise InternalError(f"model {self.name!r} v{self.version} failed: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def unload(self) -> None:
        super().unload()
        self._session = None


def _spec(arg: Any, config: ModelConfig) -> TensorSpec:
    datatype = ONNX_TO_V2.get(arg.type)
    if datatype is None:
        raise Unavailable(f"tensor {arg.name!r} has type {arg.type}, which V2 cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in arg.shape)
    for tensor in (*config.input, *config.output):
        if tensor.name == arg.name:
            declared = tuple(config.input_shape(tensor))
            if len(declared) == len(shape) and tensor.datatype == datatype:
                return TensorSpec(arg.name, datatype, declared)
            raise Unavailable(
                f"config declares {tensor.name!r} as {tensor.datatype}{list(declared)} but the "
                f"model has {datatype}{list(shape)}"
            )
    return TensorSpec(arg.name, datatype, shape)
