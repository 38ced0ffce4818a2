"""How runtimes are built on this host: the options the settings fill in.

A module of its own, free of numpy and ONNX Runtime, so that reading the settings (the
server's main process does nothing more) imports neither.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

#: The default execution-provider preference: TensorRT, then CUDA, then the CPU.
DEFAULT_PROVIDERS: tuple[str, ...] = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


@dataclass(frozen=True)
class RuntimeOptions:
    """How runtimes are built on this host; filled from the settings by the caller."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    engine_cache_dir: Path | None = None
    fp16: bool = True
    int8: bool = False
    warmup_batch_sizes: tuple[int, ...] = (1,)


def tensorrt_available() -> bool:
    """True when the TensorRT Python package and CUDA bindings are importable."""
    return (
        importlib.util.find_spec("tensorrt") is not None
        and importlib.util.find_spec("cuda") is not None
    )
