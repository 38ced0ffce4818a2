"""The settings base both the edge agent and the cloud worker build on: strict sections,
how models are run on a host, and loading a settings class from a TOML file, ``TETHER_*``
variables and command-line overrides (in that order of precedence, last wins)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings

from serving.runtime_options import DEFAULT_PROVIDERS, RuntimeOptions

S = TypeVar("S", bound=BaseSettings)


class Section(BaseModel):
    """Base of a settings section: unknown keys are an error, so typos are caught."""

    model_config = ConfigDict(extra="forbid")


class RuntimeSettings(Section):
    """How models are run on this host."""

    backend: Literal["auto", "onnxruntime", "tensorrt"] = Field(
        "auto",
        description="'auto' uses native TensorRT when it and a GPU are present, else ONNX Runtime.",
    )
    providers: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROVIDERS),
        description="ONNX Runtime execution providers in order of preference; first that works wins.",
    )
    intra_op_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads (0 = all).")
    fp16: bool = Field(True, description="Allow FP16 kernels in TensorRT engines.")
    int8: bool = Field(
        False, description="Allow INT8 kernels in TensorRT engines (needs calibration)."
    )
    engine_cache_dir: Path | None = Field(
        None, description="Where TensorRT engines are cached (default: <data_dir>/engines)."
    )

    def options(self, data_dir: Path) -> RuntimeOptions:
        """The runtime layer's options (engines cached under ``data_dir`` by default)."""
        return RuntimeOptions(
            providers=tuple(self.providers),
            intra_op_threads=self.intra_op_threads,
            engine_cache_dir=self.engine_cache_dir or data_dir / "engines",
            fp16=self.fp16,
            int8=self.int8,
        )


def load_toml_settings(
    cls: type[S], toml_files: dict[str, Path], config_file: Path | None, overrides: dict[str, Any]
) -> S:
    """Build ``cls`` from ``config_file`` (TOML), its environment variables and ``overrides``.

    ``toml_files`` is the holder the class's ``settings_customise_sources`` reads the file
    from. ``overrides`` with the value ``None`` are ignored, so unset command-line flags fall
    through to the environment and the file.
    """
    if config_file is not None and not config_file.is_file():
        raise FileNotFoundError(f"config file {config_file} does not exist")
    given = {k: v for k, v in overrides.items() if v is not None}
    toml_files.clear()
    if config_file is not None:
        toml_files["path"] = config_file
    try:
        return cls(**given)
    finally:
        toml_files.clear()
