"""Serving the edge API with a production WSGI server, never Flask's development server.

Two servers sit behind one entry point, :func:`serve`, chosen by ``http.server``:

* ``granian`` (the default): a Rust HTTP/1.1 and HTTP/2 stack that calls the WSGI app on a
  few Python threads per worker process. Parsing, keep-alive and writing cost no Python, so
  a small model answers at about twice gunicorn's rate (``docs/performance.md``).
* ``gunicorn``: gthread workers, for sites standardised on it; its worker timeout
  (``http.timeout_s``) restarts a worker that stops answering.

Both fork ``http.workers`` processes, and each builds its own agent after the fork (ONNX
Runtime sessions must not cross a fork). The workers share the repository orders through a
control file and the metrics through prometheus_client's multiprocess directory, both
reset here before any worker starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge.settings import EdgeSettings
from serving.control_file import ControlFile

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_PID_IN_NAME = re.compile(r"_(\d+)\.db$")


@dataclass(frozen=True)
class RunState:
    """The files one run of the server shares between its workers."""

    run_dir: Path
    metrics_dir: Path
    control: ControlFile

    @classmethod
    def of(cls, settings: EdgeSettings) -> RunState:
        run_dir = settings.data_dir / "run"
        return cls(run_dir, run_dir / "metrics", ControlFile(run_dir / "repository.json"))

    def prepare(self, settings: EdgeSettings) -> None:
        """Reset this run's shared state: fresh metrics, the start-up models to load."""
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        self.metrics_dir.mkdir(parents=True, exist_ok=True)
        os.environ[METRICS_ENV] = str(self.metrics_dir)
        self.control.reset(settings.startup_models())
        for name, test in settings.ab.items():  # A/B splits reach every worker this way
            versions = sorted(int(v) for v in test.split)
            self.control.record(name, "load", versions=versions, split=test.split)


#: Builds the app one worker serves, after the fork (the agent's composition root,
#: :func:`edge.worker.worker_app`, which also starts the worker's other transports).
WorkerFactory = Callable[[EdgeSettings, RunState], "Flask"]


def load_worker(worker: WorkerFactory, settings: EdgeSettings, state: RunState) -> Flask:
    """Called in each worker process after the fork: forget dead workers' gauges, then build
    the worker's app."""
    forget_dead_workers(state.metrics_dir)
    return worker(settings, state)


def forget_dead_workers(metrics_dir: Path) -> None:
    """Drop the live gauges of worker processes that no longer exist (a crashed worker's
    in-flight count would otherwise stay in ``/metrics`` for good)."""
    from prometheus_client import multiprocess

    pids = set()
    for path in metrics_dir.glob("*.db"):
        match = _PID_IN_NAME.search(path.name)
        if match:
            pids.add(int(match.group(1)))
    for pid in pids:
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, str(metrics_dir))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by the server) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def serve(settings: EdgeSettings, worker: WorkerFactory) -> None:
    """Run the edge agent's HTTP API until stopped (blocks).

    The server process itself stays light: it imports no runtime, model or metrics code
    (prometheus_client must first be imported after ``PROMETHEUS_MULTIPROC_DIR`` is set,
    which happens in :meth:`RunState.prepare`); each worker imports them after the fork.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    state = RunState.of(settings)
    state.prepare(settings)
    http = settings.http
    log.info(
        "tether edge %s serving %s on %s://%s:%d%s (%s, %s)",
        settings.device_id,
        settings.repository,
        "https" if http.tls.enabled else "http",
        http.host,
        http.port,
        f" and gRPC {settings.grpc_host()}:{settings.grpc.port}" if settings.grpc.enabled else "",
        f"{http.server}, {http.workers} worker(s) x {settings.request_threads()} thread(s)",
        "bearer tokens required" if http.auth.configured else "no authentication",
    )
    if http.server == "gunicorn":
        from edge.http.gunicorn_server import GunicornServer

        GunicornServer(settings, state, worker).run()
    else:
        from edge.http.granian_server import serve_granian

        serve_granian(settings, state, worker)
