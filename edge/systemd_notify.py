"""systemd's notify protocol for the edge agent: READY, WATCHDOG and STOPPING.

Under a ``Type=notify`` unit (``deploy/systemd/tether-edge.service``) systemd passes
``$NOTIFY_SOCKET`` (and ``$WATCHDOG_USEC`` with ``WatchdogSec=``). The protocol is one
datagram per message on that Unix socket, so the standard library is enough.

:func:`gunicorn_hooks` and ``edge.http.granian_server`` are the integration points: the
server's main process starts a :class:`ReadinessWatchdog` once it listens. The watchdog sends ``READY=1`` only when the
agent answers ``/v2/health/ready`` (every start-up model loaded and warmed up, TensorRT
engines built), then ``WATCHDOG=1`` at half the watchdog period for as long as
``/v2/health/live`` answers, so systemd restarts an agent that stops serving, not merely
one whose master process died. ``STOPPING=1`` is sent when the master exits. Without
``$NOTIFY_SOCKET`` the hooks are empty and nothing changes.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.netaddr import bracket

log = logging.getLogger(__name__)

READY_PATH = "/v2/health/ready"
LIVE_PATH = "/v2/health/live"


def send(socket_path: str, message: str) -> None:
    """Send one notify datagram; ``@name`` is a socket in the abstract namespace."""
    address = "\0" + socket_path[1:] if socket_path.startswith("@") else socket_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


@dataclass(frozen=True)
class SystemdNotifier:
    """Where to notify systemd, and how often it expects a watchdog ping."""

    socket_path: str | None = None
    watchdog_usec: int | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> SystemdNotifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (for ``pid``)."""
        socket_path = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec: int | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not watchdog_pid or watchdog_pid == str(pid)):
            watchdog_usec = int(usec)
        return cls(socket_path, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.socket_path is not None

    @property
    def ping_interval_s(self) -> float | None:
        """Half the watchdog period, as sd_watchdog_enabled(3) advises; ``None`` when off."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        """Send ``message``; ``False`` (logged, never raised) when it could not be sent."""
        if self.socket_path is None:
            return False
        try:
            send(self.socket_path, message)
        except OSError as exc:
            log.warning("systemd notify %r failed: %s", message, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


def probe(url: str, timeout_s: float) -> bool:
    """Whether ``url`` answers 200 within ``timeout_s``.

    An ``https`` URL is the agent's own loopback listener (``http.tls``): its certificate
    names the device, not the loopback address, so it is not verified here.
    """
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


class ReadinessWatchdog:
    """READY=1 once the agent is ready, then WATCHDOG=1 while it is live (a thread).

    It runs in gunicorn's master, which forks workers while it runs. A fork that happens
    while this thread is inside a probe could hand the child a lock the thread held (an
    import, logging or socket lock) and hang the new worker; so the thread does all its
    work under ``_busy``, and a fork in this process waits for it
    (:func:`os.register_at_fork`). Between probes the thread only sleeps, holding nothing.
    """

    def __init__(
        self,
        notifier: SystemdNotifier,
        base_url: str,
        *,
        poll_s: float = 0.5,
        probe_timeout_s: float = 2.0,
        check: Callable[[str, float], bool] = probe,
    ) -> None:
        self.notifier = notifier
        self.base_url = base_url.rstrip("/")
        self.poll_s = poll_s
        self.probe_timeout_s = probe_timeout_s
        self.check = check
        self.is_ready = threading.Event()
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)

    def start(self) -> None:
        os.register_at_fork(
            before=self._busy.acquire,
            after_in_parent=self._busy.release,
            after_in_child=self._busy.release,
        )
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        ready_url, live_url = self.base_url + READY_PATH, self.base_url + LIVE_PATH
        while not self._stop.is_set():
            with self._busy:
                if self.check(ready_url, self.probe_timeout_s):
                    self.notifier.ready(status=f"serving on {self.base_url}")
                    self.is_ready.set()
                    break
            self._stop.wait(self.poll_s)
        interval = self.notifier.ping_interval_s
        if interval is None:
            return
        timeout = min(self.probe_timeout_s, interval / 2)
        while not self._stop.wait(interval):
            with self._busy:
                if self.check(live_url, timeout):
                    self.notifier.watchdog()
                else:
                    log.warning("%s does not answer; no watchdog ping", live_url)


def probe_base_url(sockname: Any, tls: bool = False) -> str:
    """The URL to probe a listener bound to ``sockname`` from this host (wildcards → loopback)."""
    host, port = sockname[0], sockname[1]
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    scheme = "https" if tls else "http"
    return f"{scheme}://{bracket(host)}:{port}"


class ServerLifecycle:
    """What a server's main process tells systemd: readiness and watchdog pings once it
    listens (a :class:`ReadinessWatchdog`), ``STOPPING=1`` as it exits. Each server's
    hooks call it (:func:`gunicorn_hooks`, ``edge.http.granian_server``)."""

    def __init__(self, notifier: SystemdNotifier) -> None:
        self.notifier = notifier
        self._watchdog: ReadinessWatchdog | None = None

    def listening(self, address: Any, tls: bool) -> None:
        """The server listens on ``address``: probe it, then READY=1 and pings."""
        self._watchdog = ReadinessWatchdog(self.notifier, probe_base_url(address, tls))
        self._watchdog.start()

    def exiting(self) -> None:
        self.notifier.stopping()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None


def take_notifier(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> SystemdNotifier:
    """The notifier for this process. Reading the process environment (the default) takes
    the notify variables out of it, so that neither the server (gunicorn would send its own
    ``READY=1`` as soon as it listens, before any model is loaded) nor the workers it
    starts touch the socket."""
    source = os.environ if environ is None else environ
    notifier = SystemdNotifier.from_environ(source, os.getpid() if pid is None else pid)
    if environ is None:
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)
    return notifier


def gunicorn_hooks(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> dict[str, Callable[..., None]]:
    """gunicorn ``when_ready``/``on_exit`` hooks that notify systemd; empty outside systemd.

    ``when_ready`` runs in the master once it listens; the probe address comes from the
    bound socket, so ``port = 0`` works too. The notify variables leave the process
    environment (:func:`take_notifier`).
    """
    notifier = take_notifier(environ, pid)
    if not notifier.enabled:
        return {}
    lifecycle = ServerLifecycle(notifier)

    def when_ready(server: Any) -> None:
        listeners = getattr(server, "LISTENERS", None) or []
        if listeners:
            address = listeners[0].sock.getsockname()
        else:  # reuse_port: each worker binds its own socket; probe the configured address
            configured = getattr(getattr(server, "cfg", None), "address", None) or []
            tcp = [a for a in configured if isinstance(a, tuple)]
            if not tcp:
                notifier.ready(status="serving (no TCP listener to probe)")
                return
            address = tcp[0]
        lifecycle.listening(address, bool(getattr(getattr(server, "cfg", None), "is_ssl", False)))

    def on_exit(server: Any) -> None:
        lifecycle.exiting()

    return {"when_ready": when_ready, "on_exit": on_exit}
