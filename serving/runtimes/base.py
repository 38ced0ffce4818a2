"""The one runtime interface every backend implements.

A runtime is one loaded model version. Backends (ONNX Runtime, native TensorRT, and the
cloud client behind the uplink) are subclasses, so the router chooses between runtimes
and the data plane never knows which backend answered except through the
:class:`Prediction` it gets back.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.provenance import Provenance
from serving.runtime_options import DEFAULT_PROVIDERS, RuntimeOptions
from shared.datatypes import FLOAT_DATATYPES, to_numpy_dtype
from shared.errors import InternalError, ModelNotReady

__all__ = [
    "DEFAULT_PROVIDERS",
    "ComposedRuntime",
    "Prediction",
    "Runtime",
    "RuntimeOptions",
    "TensorSpec",
    "model_file",
    "model_flops",
]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as clients see it (``-1`` marks a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class Prediction:
    """What a runtime returns: the outputs and where and how they were produced."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    compute_ms: float = 0.0
    #: Where, by what and by which route it was produced (rendered by each transport).
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def served_by(self) -> str:
        """``edge`` or ``cloud`` (the provenance's)."""
        return self.provenance.served_by


class Runtime(ABC):
    """One model version that can be loaded, asked for predictions and unloaded."""

    #: The platform string shown in model metadata (Triton's names).
    platform: str = "unknown"
    #: Where the runtime computes: ``edge`` for local backends, ``cloud`` for the uplink.
    served_by: str = "edge"

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        #: The execution provider or engine that actually runs the model.
        self.provider: str = "none"
        #: FLOPs of one inference at batch size 1, when known.
        self.flops: int | None = None
        self.max_batch_size: int = 0
        self._ready = False

    @property
    def ready(self) -> bool:
        """True once loaded and warmed up."""
        return self._ready

    @abstractmethod
    def load(self) -> None:
        """Load the model so that :meth:`predict` works; fills inputs, outputs, provider."""

    @abstractmethod
    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on named, validated input arrays; return named output arrays."""

    def unload(self) -> None:
        """Release the model; the runtime is no longer ready."""
        self._ready = False

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run the model on synthetic inputs so the first real request pays no set-up."""
        for batch in batch_sizes:
            feeds = {spec.name: synthetic_input(spec, batch) for spec in self.inputs}
            outputs = self.predict(feeds, None)
            for spec in self.outputs:
                if spec.name not in outputs:
                    raise InternalError(f"{self.name}: warm-up gave no output {spec.name!r}")
                out = outputs[spec.name]
                if spec.datatype in FLOAT_DATATYPES and not np.all(np.isfinite(out)):
                    raise InternalError(f"{self.name}: warm-up output {spec.name!r} not finite")

    def mark_ready(self) -> None:
        self._ready = True

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        """Run :meth:`predict` and wrap its outputs with provenance and compute time."""
        if not self._ready:
            raise ModelNotReady(f"model {self.name!r} version {self.version} is not ready")
        started = time.perf_counter()
        outputs = self.predict(inputs, output_names)
        compute_ms = (time.perf_counter() - started) * 1000.0
        return Prediction(
            outputs=outputs,
            model_name=self.name,
            model_version=self.version,
            compute_ms=compute_ms,
            provenance=Provenance(served_by=self.served_by),
        )

    def escalate(
        self,
        cloud: Runtime,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
    ) -> Prediction:
        """Ask ``cloud``, a larger model for the same task, about inputs this model was sent
        (a cascade's escalation): here as they came; a model with a pipeline sends the
        smallest form the cloud model takes and completes its answer."""
        return cloud.infer(inputs, output_names)

    def escalation(self) -> Runtime | None:
        """The runtime that answers this model's escalations on their own, later (a
        cascade's cloud half); ``None`` where there is none."""
        return None

    def metadata(self) -> dict[str, Any]:
        """Model metadata in the Open Inference Protocol's shape, plus Tether's facts."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": self.platform,
            "inputs": [spec.to_metadata() for spec in self.inputs],
            "outputs": [spec.to_metadata() for spec in self.outputs],
            "parameters": {
                "execution_provider": self.provider,
                "served_by": self.served_by,
                "max_batch_size": self.max_batch_size,
                "flops": self.flops,
            },
        }


class ComposedRuntime(Runtime):
    """A runtime made of others (a route, the uplink's cloud model): it overrides
    :meth:`infer`, its outputs are what :meth:`predict` gives, and it loads nothing itself
    (its parts are loaded by the repository and the uplink)."""

    def load(self) -> None:
        """Nothing to load of its own."""

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return self.infer(inputs, output_names).outputs


def synthetic_input(spec: TensorSpec, batch: int) -> np.ndarray:
    """A zero-filled array for ``spec`` with dynamic dimensions set to ``batch`` then 1."""
    shape = [batch if i == 0 and d < 0 else (1 if d < 0 else d) for i, d in enumerate(spec.shape)]
    if spec.datatype == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=to_numpy_dtype(spec.datatype))


def model_file(version_dir: Path, filename: str) -> Path:
    """The model file in a version folder, or :class:`InternalError` naming what is missing."""
    path = version_dir / filename
    if not path.is_file():
        raise InternalError(f"missing model file {path}")
    return path


def model_flops(onnx_path: Path, declared: Any) -> int | None:
    """FLOPs of one inference: the config's ``parameters.flops`` when it declares them
    (``tether models build`` writes them), else counted from the ONNX graph.

    Counting imports the ``onnx`` package (protobuf and its C extension, ~20 MB in every
    worker), so a declared figure is preferred. Cost accounting never stops a model
    loading: a graph that cannot be counted gives ``None``.
    """
    if isinstance(declared, int) and not isinstance(declared, bool) and declared >= 0:
        return declared
    if not onnx_path.is_file():
        return None
    try:
        from serving.runtimes.flops import count_flops

        return int(count_flops(onnx_path))
    except Exception:
        logging.getLogger(__name__).warning("could not count FLOPs of %s", onnx_path, exc_info=True)
        return None
