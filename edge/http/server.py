"""Serving the edge API with gunicorn (threaded workers), never Flask's development server."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from edge.control_file import ControlFile
from edge.settings import EdgeSettings
from edge.systemd_notify import gunicorn_hooks

log = logging.getLogger(__name__)

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class EdgeServer(BaseApplication):
    """gunicorn running the edge app in ``workers`` processes of ``threads`` threads each.

    Each worker builds its own agent after the fork (ONNX Runtime sessions must not cross
    a fork); they share the repository orders through a control file and the metrics
    through prometheus_client's multiprocess directory.
    """

    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        self.run_dir = settings.data_dir / "run"
        self.metrics_dir = self.run_dir / "metrics"
        self.control = ControlFile(self.run_dir / "repository.json")
        super().__init__()

    def load_config(self) -> None:
        http = self.settings.http
        metrics_dir = self.metrics_dir

        def child_exit(server: Any, worker: Any) -> None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid, str(metrics_dir))

        options: dict[str, Any] = {
            "bind": f"{_bracket(http.host)}:{http.port}",
            "workers": http.workers,
            "threads": http.threads,
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
            "worker_tmp_dir": _heartbeat_dir(self.run_dir),
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
        from edge.agent import build_app

        return build_app(self.settings, control=self.control, multiprocess_dir=self.metrics_dir)

    def prepare(self, models: list[str]) -> None:
        """Reset this run's shared state: fresh metrics, the start-up models to load."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        os.environ[METRICS_ENV] = str(self.metrics_dir)
        self.control.reset(models)
        for name, test in self.settings.ab.items():  # A/B splits reach every worker this way
            versions = sorted(int(v) for v in test.split)
            self.control.record(name, "load", versions=versions, split=test.split)


def _heartbeat_dir(fallback: Path) -> str:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else str(fallback)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(settings: EdgeSettings) -> None:
    """Run the edge agent's HTTP API until stopped (blocks).

    The server process itself stays light: it imports no runtime, model or metrics code
    (prometheus_client must first be imported after ``PROMETHEUS_MULTIPROC_DIR`` is set,
    which happens in :meth:`EdgeServer.prepare`); each worker imports them after the fork.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = EdgeServer(settings)
    server.prepare(settings.startup_models())
    log.info(
        "tether edge %s serving %s on %s://%s:%d (%s)",
        settings.device_id,
        settings.repository,
        "https" if settings.http.tls.enabled else "http",
        settings.http.host,
        settings.http.port,
        "bearer tokens required" if settings.http.auth.configured else "no authentication",
    )
    server.run()
