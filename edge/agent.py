"""The edge agent: one process's repository, uplink, router, data plane and access guard,
built from the settings. Transport-free: the server worker (``edge/worker.py``) and the
sensor bridge each put their transports on top of one."""

from __future__ import annotations

import logging
from pathlib import Path

from edge.ab import apply_ab_tests
from edge.access.guard import Guard
from edge.router import Router
from edge.settings import EdgeSettings, needs_uplink
from edge.text_router import CloudText, TextRouter
from edge.uplink import Uplink
from serving.control_file import ControlFile
from serving.dataplane import DataPlane
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from shared import __version__
from shared.codec import TensorLimits
from shared.errors import TetherError

log = logging.getLogger(__name__)


def control_file_path(settings: EdgeSettings) -> Path:
    """Where the worker processes of one agent share their repository orders."""
    return settings.data_dir / "run" / "repository.json"


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
        #: Tokens and rate limits, one guard for every transport of this worker.
        self.guard = Guard.from_settings(settings.http)
        self.limits = TensorLimits(max_elements=settings.http.max_tensor_elements)
        # Per-version errors and shadow agreement for a fleet agent in another process.
        from edge.fleet_health import install_worker_health

        self.shadow = install_worker_health(self)

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
