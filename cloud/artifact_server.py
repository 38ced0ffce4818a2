"""``tether fleet artifacts``: the artifact server on granian, a production WSGI server.

Devices download model artifacts from it (``GET /artifacts/<sha256>`` with Range support,
:func:`cloud.artifacts.create_app`) and Prometheus reads the fleet's rollout metrics from
its ``/metrics``. It is the fleet's only listening socket facing devices, so it runs in a
process of its own that never holds the fleet's signing key: it reads the artifact store
and the fleet database, nothing else. granian parses HTTP in Rust and calls the app on
``http_threads`` threads in each of ``http_workers`` forked processes; a worker that exits
is started again.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from functools import partial
from typing import TYPE_CHECKING

from cloud.fleet_settings import FleetSettings
from shared.tracing import GRANIAN_LOGGING

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

#: Seconds a stopping worker gets to finish its downloads.
_GRACEFUL_S = 10


def worker_app(settings: FleetSettings) -> Flask:
    """The app one worker serves, built in the worker after the fork (its own database
    connection pool)."""
    from cloud.artifacts import ArtifactStore, create_app
    from cloud.fleet_db import FleetDB
    from cloud.fleet_metrics import FleetMetrics

    db = FleetDB(settings.database, prefix=settings.table_prefix)
    return create_app(ArtifactStore(settings.artifacts), metrics=FleetMetrics(db).render)


def serve(settings: FleetSettings) -> None:
    """Run the artifact server until SIGINT or SIGTERM (blocks)."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    if sys.platform.startswith("linux"):
        # Workers inherit the settings by fork (granian follows this start method).
        multiprocessing.set_start_method("fork", force=True)
    log.info(
        "artifact server on http://%s:%d (granian, %d worker(s) x %d thread(s)), store %s",
        settings.http_host,
        settings.http_port,
        settings.http_workers,
        settings.http_threads,
        settings.artifacts,
    )
    server = Server(
        "tether-artifacts",
        address=settings.http_host,
        port=settings.http_port,
        interface=Interfaces.WSGI,
        workers=settings.http_workers,
        blocking_threads=settings.http_threads,
        http=HTTPModes.auto,
        websockets=False,
        log_level=LogLevels.info,
        log_dictconfig=GRANIAN_LOGGING,
        log_access=False,
        respawn_failed_workers=True,
        workers_kill_timeout=_GRACEFUL_S,
    )
    server.serve(target_loader=partial(worker_app, settings), wrap_loader=False)
