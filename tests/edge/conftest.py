"""Edge fixtures: a repository of small generated models and an app around it."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask import Flask

from edge.settings import EdgeSettings, load_settings
from edge.worker import build_app
from harness.onnx_models import dense_model, write_model

DENSE_CONFIG = {
    "max_batch_size": 8,
    "input": [{"name": "x", "datatype": "FP32", "dims": [4]}],
    "output": [{"name": "y", "datatype": "FP32", "dims": [3]}],
}


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """``dense`` (v1, v2; policy latest 1) and ``plain`` (no config file)."""
    root = tmp_path / "repository"
    write_model(root, "dense", dense_model(seed=1), version=1, config=DENSE_CONFIG)
    write_model(root, "dense", dense_model(seed=2), version=2)
    write_model(root, "plain", dense_model(in_features=2, out_features=2, seed=3))
    return root


@pytest.fixture
def settings(tmp_path: Path, repository: Path) -> EdgeSettings:
    return load_settings(None, repository=repository, data_dir=tmp_path / "data")


@pytest.fixture(params=[True, False], ids=["fast-path", "flask-view"])
def app(settings: EdgeSettings, request: pytest.FixtureRequest) -> Flask:
    """The app with inference answered by the WSGI fast path, and by Flask's view: both
    must behave the same."""
    http = settings.http.model_copy(update={"fast_path": request.param})
    return build_app(settings.model_copy(update={"http": http}))
