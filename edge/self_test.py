"""The self-test a staged model version must pass before it may serve.

It runs on a runtime instance of its own (never the one serving), so a version that
fails costs the device nothing: the version loads, answers warm-up inputs (zeros, as the
repository's warm-up, and seeded random values within the model's declared shapes),
gives every declared output with the declared shape and the input's batch size, and every
floating-point output value is finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.model_config import load_model_config
from serving.runtimes import Runtime, RuntimeOptions, create_runtime
from serving.runtimes.base import TensorSpec, synthetic_input
from shared.datatypes import FLOAT_DATATYPES
from shared.errors import TetherError


class SelfTestFailed(TetherError):
    """A staged version did not pass its self-test."""

    status = 422
    reason = "self_test"


def self_test(
    model_dir: Path,
    version: int,
    options: RuntimeOptions,
    *,
    backend: str = "auto",
    batch_sizes: tuple[int, ...] = (1, 2),
) -> None:
    """Load ``<model_dir>/<version>`` on a fresh runtime and check it; raises SelfTestFailed."""
    try:
        config = load_model_config(model_dir)
        runtime = create_runtime(config, str(version), model_dir / str(version), options, backend)
        runtime.load()
    except Exception as exc:
        raise SelfTestFailed(f"self-test: version {version} does not load: {_why(exc)}") from exc
    try:
        batches = batch_sizes if runtime.max_batch_size != 1 else (1,)
        rng = np.random.default_rng(version)
        for batch in batches:
            if runtime.max_batch_size and batch > runtime.max_batch_size:
                continue
            zeros = {spec.name: synthetic_input(spec, batch) for spec in runtime.inputs}
            _check(runtime, zeros, batch, "zeros")
            noise = {spec.name: _random_input(spec, batch, rng) for spec in runtime.inputs}
            _check(runtime, noise, batch, "random inputs")
    finally:
        runtime.unload()


def _check(runtime: Runtime, feeds: dict[str, np.ndarray], batch: int, what: str) -> None:
    try:
        outputs = runtime.predict(feeds, None)
    except Exception as exc:
        raise SelfTestFailed(f"self-test: inference on {what} failed: {_why(exc)}") from exc
    batched = any(spec.shape and spec.shape[0] < 0 for spec in runtime.inputs)
    for spec in runtime.outputs:
        out = outputs.get(spec.name)
        if out is None:
            raise SelfTestFailed(f"self-test: no output {spec.name!r} on {what}")
        if not _shape_ok(spec, out.shape, batch if batched else None):
            raise SelfTestFailed(
                f"self-test: output {spec.name!r} has shape {list(out.shape)} on {what}, "
                f"model declares {list(spec.shape)}"
            )
        if spec.datatype in FLOAT_DATATYPES and not np.all(np.isfinite(out)):
            raise SelfTestFailed(f"self-test: output {spec.name!r} is not finite on {what}")


def _shape_ok(spec: TensorSpec, shape: tuple[int, ...], batch: int | None) -> bool:
    if len(shape) != len(spec.shape):
        return False
    for index, (want, got) in enumerate(zip(spec.shape, shape, strict=True)):
        if index == 0 and batch is not None and want < 0 and got != batch:
            return False
        if want >= 0 and want != got:
            return False
    return True


def _random_input(spec: TensorSpec, batch: int, rng: np.random.Generator) -> np.ndarray:
    base = synthetic_input(spec, batch)
    if spec.datatype in FLOAT_DATATYPES:
        return rng.standard_normal(base.shape).astype(base.dtype)
    if base.dtype.kind in "iu":
        return rng.integers(0, 2, size=base.shape).astype(base.dtype)
    return base


def _why(exc: Exception) -> str:
    return exc.message if isinstance(exc, TetherError) else f"{type(exc).__name__}: {exc}"
