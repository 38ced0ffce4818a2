"""The edge API on gunicorn (gthread workers): ``http.server = "gunicorn"``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunicorn.app.base import BaseApplication

from edge.settings import EdgeSettings
from edge.systemd_notify import gunicorn_hooks
from shared.netaddr import bracket

if TYPE_CHECKING:
    from edge.http.server import RunState, WorkerFactory


class GunicornServer(BaseApplication):
    """gunicorn running the edge app in ``workers`` processes of ``threads`` threads each."""

    def __init__(self, settings: EdgeSettings, state: RunState, worker: WorkerFactory) -> None:
        self.settings = settings
        self.state = state
        self.worker = worker
        super().__init__()

    def load_config(self) -> None:
        http = self.settings.http
        metrics_dir = self.state.metrics_dir

        def child_exit(server: Any, worker: Any) -> None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, str(metrics_dir))

        options: dict[str, Any] = {
            "bind": f"{bracket(http.host)}:{http.port}",
            "workers": http.workers,
            "threads": self.settings.request_threads(),
            "worker_class": "gthread",
            "timeout": http.timeout_s,
            "graceful_timeout": 10,
            "keepalive": 5,
            "proc_name": "tether-edge",
            "accesslog": None,
            "errorlog": "-",
            "loglevel": "info",
            "child_exit": child_exit,
            # The heartbeat file is touched on every loop of every worker: keep it in
            # memory (gunicorn's advice), not on a disk whose metadata writes can stall.
            "worker_tmp_dir": _heartbeat_dir(self.state.run_dir),
            "control_socket_disable": True,
            # Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads new
            # connections over the workers. With one shared socket, a burst of keep-alive
            # connections can all land on one worker while the other idles (docs/performance.md).
            # (A random port, 0, would differ per worker: one shared socket then.)
            "reuse_port": http.port != 0,
        }
        # READY/WATCHDOG/STOPPING to systemd under a Type=notify unit; empty otherwise.
        options.update(gunicorn_hooks())
        if http.tls.enabled:
            options["certfile"] = str(http.tls.cert_file)
            options["keyfile"] = str(http.tls.key_file)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from edge.http.server import load_worker

        return load_worker(self.worker, self.settings, self.state)


def _heartbeat_dir(fallback: Path) -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(fallback)
