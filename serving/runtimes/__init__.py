"""Runtimes: the backends that run a model version behind one interface."""

from __future__ import annotations

from pathlib import Path

from serving.model_config import ModelConfig
from serving.runtime_options import tensorrt_available
from serving.runtimes.base import Prediction, Runtime, RuntimeOptions, TensorSpec

__all__ = [
    "Prediction",
    "Runtime",
    "RuntimeOptions",
    "TensorSpec",
    "create_runtime",
    "tensorrt_available",
]


def create_runtime(
    config: ModelConfig,
    version: str,
    version_dir: Path,
    options: RuntimeOptions,
    backend: str = "auto",
) -> Runtime:
    """Build (not load) the runtime for one model version.

    Language models (``llama_cpp_gguf``) run on llama.cpp and sentence encoders
    (``onnx_text_embedding``) on ONNX Runtime with their tokenizer, whatever ``backend``.
    ``backend`` is ``auto`` (native TensorRT for ``tensorrt_plan`` models or when TensorRT
    is installed, ONNX Runtime otherwise), ``onnxruntime`` or ``tensorrt``. A config that
    declares a ``pipeline`` gets the backend wrapped in its pre- and post-processing.
    """
    runtime = _backend_runtime(config, version, version_dir, options, backend)
    if config.pipeline is None:
        return runtime
    from serving.pipelines.runtime import PipelineRuntime

    return PipelineRuntime(runtime, config.pipeline, version_dir.parent)


def _backend_runtime(
    config: ModelConfig,
    version: str,
    version_dir: Path,
    options: RuntimeOptions,
    backend: str,
) -> Runtime:
    if config.platform == "llama_cpp_gguf":
        from serving.runtimes.llama import LlamaRuntime

        return LlamaRuntime(config.name, version, version_dir, config, options)
    if config.platform == "onnx_text_embedding":
        from serving.runtimes.embeddings import EmbeddingRuntime

        return EmbeddingRuntime(config.name, version, version_dir, config, options)
    use_tensorrt = backend == "tensorrt" or config.platform == "tensorrt_plan"
    if backend == "auto" and not use_tensorrt:
        use_tensorrt = tensorrt_available()
    if use_tensorrt and backend != "onnxruntime":
        from serving.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(config.name, version, version_dir, config, options)
    from serving.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(config.name, version, version_dir, config, options)
