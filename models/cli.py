"""``tether models``: build the model repository and TensorRT engines for this device."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from models.build import DEFAULT_OUTPUT, build_command
from models.distill import distill_command


@click.group("models")
def models_group() -> None:
    """Build the model repository, distil student heads, build TensorRT engines."""


models_group.add_command(build_command)
models_group.add_command(distill_command)


@models_group.command("build-engine")
@click.argument("model")
@click.option("--version", default="1", show_default=True, help="Model version to build.")
@click.option(
    "--repository",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=DEFAULT_OUTPUT,
    show_default=True,
    help="The model repository holding <model>/<version>/model.onnx.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The engine cache (the edge's engine_cache_dir).",
)
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="Allow FP16 kernels.")
@click.option(
    "--int8", is_flag=True, help="Allow INT8 kernels, calibrated on the digits calibration split."
)
@click.option("--max-batch", type=int, default=None, help="Largest batch (default: the config's).")
def build_engine_command(
    model: str,
    version: str,
    repository: Path,
    cache_dir: Path,
    fp16: bool,
    int8: bool,
    max_batch: int | None,
) -> None:
    """Build (or find cached) the TensorRT engine of MODEL for this GPU and TensorRT."""
    from serving.model_config import load_model_config
    from serving.runtimes.tensorrt_engine import EngineOptions, get_or_build_engine
    from shared.errors import TetherError

    config = load_model_config(repository / model)
    options = EngineOptions(
        fp16=fp16, int8=int8, max_batch_size=max_batch or max(1, config.max_batch_size)
    )
    calibration: np.ndarray | None = None
    if int8:
        from models.digits import load_split

        calibration, _ = load_split("calibration")
    onnx_path = repository / model / version / "model.onnx"
    try:
        engine = get_or_build_engine(
            onnx_path, cache_dir, model, version, options, calibration=calibration
        )
    except TetherError as exc:
        raise click.ClickException(exc.message) from exc
    state = "cached" if engine.cached else "built"
    click.echo(f"{state} {options.precision} engine {engine.path}")
