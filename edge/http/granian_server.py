"""The edge API on granian: ``http.server = "granian"`` (the default).

granian accepts, parses and writes HTTP in Rust and calls the WSGI app on ``http.threads``
Python threads in each of ``http.workers`` forked processes, so a request costs Python only
for the app itself. A worker that exits is started again.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from functools import partial
from typing import TYPE_CHECKING

from edge.settings import EdgeSettings
from edge.systemd_notify import ServerLifecycle, take_notifier
from shared.tracing import GRANIAN_LOGGING

if TYPE_CHECKING:
    from edge.http.server import RunState, WorkerFactory

log = logging.getLogger(__name__)

#: Seconds a stopping worker gets to finish its requests.
GRACEFUL_TIMEOUT_S = 10


def serve_granian(settings: EdgeSettings, state: RunState, worker: WorkerFactory) -> None:
    """Run granian until SIGINT or SIGTERM (blocks)."""
    from granian.constants import HTTPModes, Interfaces
    from granian.log import LogLevels
    from granian.server import Server

    from edge.http.server import load_worker

    if sys.platform.startswith("linux"):
        # Workers must inherit the prepared state by fork (granian follows this setting;
        # Python 3.14 would otherwise start them fresh, without it).
        multiprocessing.set_start_method("fork", force=True)
    http = settings.http
    notifier = take_notifier()
    server = Server(
        "tether-edge",
        address=http.host,
        port=http.port,
        interface=Interfaces.WSGI,
        workers=http.workers,
        blocking_threads=settings.request_threads(),
        http=HTTPModes.auto,
        websockets=False,
        log_level=LogLevels.info,
        log_dictconfig=GRANIAN_LOGGING,
        log_access=False,
        ssl_cert=http.tls.cert_file if http.tls.enabled else None,
        ssl_key=http.tls.key_file if http.tls.enabled else None,
        respawn_failed_workers=True,
        workers_kill_timeout=GRACEFUL_TIMEOUT_S,
    )
    if notifier.enabled:
        lifecycle = ServerLifecycle(notifier)

        def started() -> None:
            # The probe address comes from the bound socket, so ``port = 0`` works too.
            bound = getattr(server, "_sso", None)
            address = bound.getsockname() if bound is not None else (http.host, http.port)
            lifecycle.listening(address, http.tls.enabled)

        server.on_startup(started)
        server.on_shutdown(lifecycle.exiting)
    server.serve(target_loader=partial(load_worker, worker, settings, state), wrap_loader=False)
