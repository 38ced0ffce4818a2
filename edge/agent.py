"""The edge agent's composition root: builds one worker's parts from the settings."""

from __future__ import annotations

import logging
from pathlib import Path

from flask import Flask

from edge.control_file import ControlFile
from edge.dataplane import DataPlane
from edge.http.app import create_app
from edge.metrics import EdgeMetrics
from edge.model_config import list_models
from edge.repository import ModelRepository
from edge.settings import EdgeSettings
from shared import __version__
from shared.codec import TensorLimits
from shared.errors import TetherError

log = logging.getLogger(__name__)


def control_file_path(settings: EdgeSettings) -> Path:
    """Where the worker processes of one agent share their repository orders."""
    return settings.data_dir / "run" / "repository.json"


def startup_models(settings: EdgeSettings) -> list[str]:
    """The models to load at start: the configured list, or every model on disk."""
    if settings.models is not None:
        return list(settings.models)
    return list_models(settings.repository)


class EdgeAgent:
    """One worker's repository and data plane (and, later, router and uplink)."""

    def __init__(
        self,
        settings: EdgeSettings,
        *,
        control: ControlFile | None = None,
        multiprocess_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.repository = ModelRepository(
            settings.repository,
            settings.runtime_options(),
            backend=settings.runtime.backend,
            control=control,
        )
        self.metrics = EdgeMetrics(multiprocess_dir)
        self.dataplane = DataPlane(self.repository, self.metrics, version=__version__)

    def start(self) -> None:
        """Load the start-up models; a model that fails is reported, the rest still serve.

        With a control file (several worker processes), the server has written the
        start-up models into it and every worker loads what it says.
        """
        if self.repository.control is not None:
            self.repository.sync()
        else:
            for name in startup_models(self.settings):
                try:
                    self.repository.load(name)
                except TetherError as exc:
                    log.error("model %s not loaded: %s", name, exc.message)
        self.dataplane.publish_readiness()

    def app(self) -> Flask:
        return create_app(
            self.dataplane,
            max_body_bytes=self.settings.http.max_body_bytes,
            limits=TensorLimits(max_elements=self.settings.http.max_tensor_elements),
        )


def build_app(
    settings: EdgeSettings,
    *,
    control: ControlFile | None = None,
    multiprocess_dir: Path | None = None,
) -> Flask:
    """Build a started agent and return its Flask app (used by the server and tests)."""
    agent = EdgeAgent(settings, control=control, multiprocess_dir=multiprocess_dir)
    agent.start()
    app = agent.app()
    app.extensions["tether.agent"] = agent
    return app
