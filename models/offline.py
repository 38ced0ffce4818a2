"""Repository models run in this process over whole datasets (calibration, distillation).

Each model is loaded the way the server loads it (its config, its pipeline, ONNX Runtime on
the CPU), so scores here are the scores serving gives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.datasets import Dataset
from serving.model_config import list_versions, load_model_config
from serving.pipelines.runtime import PipelineRuntime
from serving.runtimes import Runtime, RuntimeOptions, create_runtime

CPU = ("CPUExecutionProvider",)
#: Rows per call: bounded memory for image batches, few enough calls for small models.
BATCH = 32


def load_model(repository: Path, name: str, version: str | None = None) -> Runtime:
    """``name`` (its latest served version unless one is named), loaded and ready."""
    model_dir = repository / name
    if not model_dir.is_dir() or not list_versions(model_dir):
        raise FileNotFoundError(f"no model {name!r} in {repository}")
    config = load_model_config(model_dir)
    chosen = version or str(config.version_policy.select(list_versions(model_dir))[-1])
    runtime = create_runtime(
        config, chosen, model_dir / chosen, RuntimeOptions(providers=CPU), "onnxruntime"
    )
    runtime.load()
    runtime.mark_ready()
    return runtime


def class_names(runtime: Runtime) -> list[str]:
    """The model's class names, when its pipeline has a labels file."""
    if isinstance(runtime, PipelineRuntime) and runtime.labeller is not None:
        return runtime.labeller.names
    return []


def scores(runtime: Runtime, data: Dataset, output: str | None = None) -> np.ndarray:
    """The model's ``output`` (default: its first) for every row of ``data``."""
    name = output or runtime.outputs[0].name
    parts = [
        runtime.predict(_rows(data, start), [name])[name] for start in range(0, len(data), BATCH)
    ]
    return np.concatenate(parts).astype(np.float64)


def features(runtime: Runtime, data: Dataset) -> tuple[str, np.ndarray]:
    """The network's own input for every row (after the pipeline's input stage): its name
    and values. A classification head is trained on these."""
    inner = runtime.inner if isinstance(runtime, PipelineRuntime) else runtime
    if len(inner.inputs) != 1 or len(inner.inputs[0].shape) != 2:
        shapes = ", ".join(f"{s.name}{list(s.shape)}" for s in inner.inputs)
        raise ValueError(
            f"model {runtime.name!r} takes {shapes}: a classification head takes one feature "
            "vector per row ([batch, features])"
        )
    name = inner.inputs[0].name
    parts = []
    for start in range(0, len(data), BATCH):
        rows = _rows(data, start)
        feeds = runtime.prepare(rows) if isinstance(runtime, PipelineRuntime) else rows
        parts.append(np.asarray(feeds[name], dtype=np.float32))
    return name, np.concatenate(parts)


def _rows(data: Dataset, start: int) -> dict[str, np.ndarray]:
    return {name: array[start : start + BATCH] for name, array in data.inputs.items()}
