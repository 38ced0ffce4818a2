"""A model's configuration file: ``<repository>/<name>/config.json``.

The semantics follow Triton's ``config.pbtxt`` (inputs and outputs without the batch
dimension when ``max_batch_size > 0``, version policies), written as JSON so any tool can
read it. A model without a config file gets one derived from its model file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.pipelines.config import PipelineConfig
from shared.errors import InvalidInput

CONFIG_FILE = "config.json"

Platform = Literal["onnxruntime_onnx", "tensorrt_plan", "onnx_text_embedding", "llama_cpp_gguf"]
#: The model file of each platform in a version folder.
MODEL_FILES: dict[str, str] = {
    "onnxruntime_onnx": "model.onnx",
    "tensorrt_plan": "model.plan",
    "onnx_text_embedding": "model.onnx",
    "llama_cpp_gguf": "model.gguf",
}


class TensorConfig(BaseModel):
    """One input or output: name, V2 datatype and dims (without the batch dimension)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    datatype: str
    dims: list[int]
    optional: bool = False

    @model_validator(mode="after")
    def _known_datatype(self) -> TensorConfig:
        # imported here: listing a repository (the server's main process) needs no numpy
        from shared.datatypes import V2_TO_NUMPY

        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"unknown datatype {self.datatype!r} for tensor {self.name!r}")
        return self


class LatestPolicy(BaseModel):
    num_versions: int = Field(1, ge=1)


class SpecificPolicy(BaseModel):
    versions: list[int]


class VersionPolicy(BaseModel):
    """Which versions on disk are served: the latest N (default 1), all, or a specific set."""

    model_config = ConfigDict(extra="forbid")

    latest: LatestPolicy | None = None
    all: dict[str, Any] | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"version_policy names more than one kind: {chosen}")
        if not chosen:
            self.latest = LatestPolicy(num_versions=1)
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves out of those on disk, ascending."""
        ordered = sorted(set(available))
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific.versions)]
        assert self.latest is not None
        return ordered[-self.latest.num_versions :]


class ModelConfig(BaseModel):
    """What the repository knows about a model before loading it."""

    model_config = ConfigDict(extra="ignore")

    name: str
    platform: Platform = "onnxruntime_onnx"
    max_batch_size: int = Field(0, ge=0)
    input: list[TensorConfig] = Field(default_factory=list)
    output: list[TensorConfig] = Field(default_factory=list)
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    #: Free-form facts about the model (accuracy, FLOPs, role) shown in model metadata.
    parameters: dict[str, Any] = Field(default_factory=dict)
    #: Pre- and post-processing the server runs around the model (``serving.pipelines``).
    pipeline: PipelineConfig | None = None

    @property
    def model_filename(self) -> str:
        return MODEL_FILES[self.platform]

    def input_shape(self, tensor: TensorConfig) -> list[int]:
        """The full shape clients see, with ``-1`` for the batch dimension when batched."""
        return ([-1] if self.max_batch_size > 0 else []) + list(tensor.dims)

    def client_inputs(self) -> list[TensorConfig]:
        """The inputs clients send: the declared ones, with a pipeline's in their place."""
        stage = self.pipeline.input if self.pipeline else None
        if stage is None:
            return list(self.input)
        filled = stage.tensors
        # the stage's input takes the place of the first tensor it fills; the others go
        inputs = [t for t in self.input if t.name not in filled[1:]]
        return [
            TensorConfig(name=stage.name, datatype="BYTES", dims=[]) if t.name == filled[0] else t
            for t in inputs
        ]

    def client_outputs(self) -> list[TensorConfig]:
        """The outputs clients get: the declared ones, plus a pipeline's."""
        stage = self.pipeline.output if self.pipeline else None
        if stage is None:
            return list(self.output)
        return [*self.output, TensorConfig(name=stage.name, datatype="BYTES", dims=[stage.k])]


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read ``<model_dir>/config.json``; a missing file gives a config named after the folder."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelConfig(name=model_dir.name)
    try:
        raw = json.loads(path.read_text())
        raw.setdefault("name", model_dir.name)
        config = ModelConfig.model_validate(raw)
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise InvalidInput(f"bad model config {path}: {exc}") from exc
    if config.name != model_dir.name:
        raise InvalidInput(
            f"model config {path} names {config.name!r} but lives in folder {model_dir.name!r}"
        )
    return config


def list_models(root: Path) -> list[str]:
    """Models in a repository folder: folders holding at least one numeric version folder."""
    if not root.is_dir():
        return []
    return sorted(
        d.name
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".") and list_versions(d)
    )


def list_versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    return sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())
