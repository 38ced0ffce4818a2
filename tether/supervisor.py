"""A small process supervisor for ``tether up``: start services in order, restart the ones
that die, stop them all together on Ctrl-C or SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from shared.shutdown import ShutdownSignals

log = logging.getLogger("tether.up")


@dataclass
class Service:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    #: Returns True once the service answers; ``start`` waits for it.
    ready: Callable[[], bool] | None = None
    ready_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0


class Supervisor:
    """Runs services until told to stop; a crashed service is restarted with backoff."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self._stop = ShutdownSignals((signal.SIGINT, signal.SIGTERM))

    def start_all(self) -> None:
        for service in self.services:
            self._start(service)
            if service.ready is not None:
                self._wait_ready(service)

    def _start(self, service: Service) -> None:
        log.info("starting %s: %s", service.name, " ".join(service.argv))
        service.process = subprocess.Popen(
            service.argv, env={**os.environ, **service.env}, start_new_session=True
        )

    def _wait_ready(self, service: Service) -> None:
        assert service.ready is not None and service.process is not None
        deadline = time.monotonic() + service.ready_timeout_s
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited with {service.process.returncode}")
            if service.ready():
                log.info("%s is ready", service.name)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{service.name} was not ready within {service.ready_timeout_s:g}s")

    def run(self) -> None:
        """Start everything, then watch until SIGINT/SIGTERM; always stops what it started."""
        self._stop.install()
        try:
            self.start_all()
            log.info("stack is up; Ctrl-C stops it")
            while not self._stop.wait(0.5):
                for service in self.services:
                    if service.process is not None and service.process.poll() is not None:
                        code = service.process.returncode
                        service.restarts += 1
                        delay = min(30.0, 0.5 * 2 ** min(service.restarts, 6))
                        log.warning(
                            "%s exited with %s; restart %d in %.1fs",
                            service.name, code, service.restarts, delay,
                        )  # fmt: skip
                        if self._stop.wait(delay):
                            break
                        self._start(service)
        finally:
            self.stop_all()
            self._stop.restore()

    def stop(self) -> None:
        self._stop.set()

    def stop_all(self, timeout_s: float = 20.0) -> None:
        """SIGTERM every service (last started first), then SIGKILL stragglers."""
        for service in reversed(self.services):
            if service.process is not None and service.process.poll() is None:
                log.info("stopping %s", service.name)
                os.killpg(service.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for service in reversed(self.services):
            process = service.process
            if process is None:
                continue
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
