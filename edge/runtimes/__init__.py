"""Runtimes: the backends that run a model version behind one interface."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge.model_config import ModelConfig
from edge.runtimes.base import Prediction, Runtime, RuntimeOptions, TensorSpec

__all__ = ["Prediction", "Runtime", "RuntimeOptions", "TensorSpec", "create_runtime"]


def tensorrt_available() -> bool:
    """True when the TensorRT Python package and CUDA bindings are importable."""
    return (
        importlib.util.find_spec("tensorrt") is not None
        and importlib.util.find_spec("cuda") is not None
    )


def create_runtime(
    config: ModelConfig,
    version: str,
    version_dir: Path,
    options: RuntimeOptions,
    backend: str = "auto",
) -> Runtime:
    """Build (not load) the runtime for one model version.

    ``backend`` is ``auto`` (native TensorRT for ``tensorrt_plan`` models or when TensorRT
    is installed, ONNX Runtime otherwise), ``onnxruntime`` or ``tensorrt``.
    """
    use_tensorrt = backend == "tensorrt" or config.platform == "tensorrt_plan"
    if backend == "auto" and not use_tensorrt:
        use_tensorrt = tensorrt_available()
    if use_tensorrt and backend != "onnxruntime":
        from edge.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(config.name, version, version_dir, config, options)
    from edge.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(config.name, version, version_dir, config, options)
