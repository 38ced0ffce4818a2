"""An edge agent's Flask app in this process, over a private copy of some built models."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flask import Flask

from edge.agent import EdgeAgent
from edge.settings import load_settings
from edge.worker import build_app
from serving.settings import RuntimeSettings


@contextmanager
def edge_app(root: Path, models: list[Path]) -> Iterator[Flask]:
    """The app serving copies of the model folders ``models`` (from ``root``), on ONNX
    Runtime's CPU provider; its agent is closed on the way out."""
    for model in models:
        shutil.copytree(model, root / "repository" / model.name)
    settings = load_settings(
        None,
        repository=root / "repository",
        data_dir=root / "data",
        runtime=RuntimeSettings(backend="onnxruntime", providers=["CPUExecutionProvider"]),
    )
    application = build_app(settings)
    try:
        yield application
    finally:
        agent = application.extensions["tether.agent"]
        assert isinstance(agent, EdgeAgent)
        agent.close()
