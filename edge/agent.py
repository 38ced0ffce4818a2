"""The edge agent's composition root: builds one worker's parts from the settings."""

from __future__ import annotations

import atexit
import logging
from pathlib import Path

from flask import Flask

from edge.ab import apply_ab_tests
from edge.control_file import ControlFile
from edge.dataplane import DataPlane
from edge.fleet.health_figures import install_worker_health
from edge.http.app import create_app
from edge.metrics import EdgeMetrics
from edge.repository import ModelRepository
from edge.router import Router
from edge.settings import EdgeSettings, needs_uplink
from edge.text_router import CloudText, TextRouter
from edge.uplink import Uplink
from shared import __version__
from shared.codec import TensorLimits
from shared.errors import TetherError

log = logging.getLogger(__name__)


def startup_models(settings: EdgeSettings) -> list[str]:
    """The models to load at start (see :meth:`EdgeSettings.startup_models`)."""
    return settings.startup_models()


class EdgeAgent:
    """One worker's repository, uplink to the cloud, router and data plane."""

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
        self.uplink: Uplink | None = None
        enabled = settings.uplink.enabled
        if enabled or (enabled is None and needs_uplink(settings.routes)):
            self.uplink = Uplink(
                settings.mqtt_url,
                settings.device_id,
                settings.uplink,
                metrics=self.metrics,
                tls=settings.mqtt_tls_config(),
            )
        self.router = Router(
            self.repository,
            settings.routes,
            self.uplink,
            metrics=self.metrics,
            price_per_1000=settings.cloud_price_per_1000,
        )
        self.dataplane = DataPlane(
            self.repository, self.metrics, version=__version__, resolver=self.router.resolve
        )
        self.text_router = TextRouter(self.repository, settings.routes, self._cloud_text())
        # Per-version errors and shadow agreement for a fleet agent in another process.
        self.shadow = install_worker_health(settings, self.metrics, self.dataplane, self.uplink)

    def _cloud_text(self) -> CloudText | None:
        """The uplink's text client (cloud language and embedding models), when there is one."""
        if self.uplink is None:
            return None
        from edge.text_uplink import UplinkText

        return UplinkText(self.uplink)

    def start(self) -> None:
        """Load the start-up models; a model that fails is reported, the rest still serve.

        With a control file (several worker processes), the server has written the
        start-up models into it and every worker loads what it says. The uplink connects
        in the background: a broker that is down only makes cloud routes fail fast.
        """
        if self.uplink is not None:
            self.uplink.start()
        if self.shadow is not None:
            self.shadow.start()
        if self.repository.control is not None:
            self.repository.sync()
        else:
            for name in startup_models(self.settings):
                try:
                    self.repository.load(name)
                except TetherError as exc:
                    log.error("model %s not loaded: %s", name, exc.message)
            apply_ab_tests(self.repository, self.settings.ab)
        self.dataplane.publish_readiness()

    def close(self) -> None:
        """Release what the agent holds: the uplink's connection (idempotent)."""
        if self.shadow is not None:
            self.shadow.stop()
        if self.uplink is not None:
            self.uplink.close()

    def app(self) -> Flask:
        """The HTTP app, with the token guard and rate limits the settings ask for."""
        from edge.http.auth import install_security

        app = create_app(
            self.dataplane,
            max_body_bytes=self.settings.http.max_body_bytes,
            limits=TensorLimits(max_elements=self.settings.http.max_tensor_elements),
            access_log=self.settings.http.access_log,
            fast_path=self.settings.http.fast_path,
        )
        install_security(app, self.settings.http)  # tokens and rate limits (docs/security.md)
        from edge.openai.metrics import TextMetrics
        from edge.openai.routes import install_openai
        from edge.openai.serving import OpenAIServing

        text_metrics = TextMetrics(self.metrics.registry)
        install_openai(app, OpenAIServing(self.text_router, text_metrics))  # /v1 (docs/openai.md)
        return app


def build_app(
    settings: EdgeSettings,
    *,
    control: ControlFile | None = None,
    multiprocess_dir: Path | None = None,
) -> Flask:
    """Build a started agent and return its Flask app (used by the server and tests)."""
    agent = EdgeAgent(settings, control=control, multiprocess_dir=multiprocess_dir)
    agent.start()
    atexit.register(agent.close)
    app = agent.app()
    app.extensions["tether.agent"] = agent
    return app
