"""edge/systemd_notify.py against a real notify socket, a real HTTP server and a real agent."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edge.systemd_notify import (
    ReadinessWatchdog,
    SystemdNotifier,
    gunicorn_hooks,
    probe_base_url,
)
from tests.deploy.env_names import ROOT


class NotifySocket:
    """systemd's side: a datagram socket collecting notify messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + path[1:] if path.startswith("@") else path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout_s: float = 10.0) -> list[str]:
        until = time.monotonic() + timeout_s
        while time.monotonic() < until:
            if any(text in m for m in self.messages):
                return self.messages
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(4096).decode())
        raise AssertionError(f"no {text!r} in {self.messages}")


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify"))
    yield listener
    listener.sock.close()


class Health(BaseHTTPRequestHandler):
    ready = False
    live = True

    def do_GET(self) -> None:
        ok = {"/v2/health/ready": Health.ready, "/v2/health/live": Health.live}.get(self.path)
        self.send_response(200 if ok else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[str]:
    Health.ready, Health.live = False, True
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_environment_is_read() -> None:
    assert not SystemdNotifier.from_environ({}, 1).enabled
    notifier = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7
    )
    assert notifier.enabled and notifier.ping_interval_s == 15.0
    other = SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "8"}, 7
    )
    assert other.ping_interval_s is None, "the watchdog is another process's"
    assert gunicorn_hooks({}, 1) == {}, "outside systemd nothing is hooked"


def test_messages_reach_the_socket(notify_socket: NotifySocket) -> None:
    notifier = SystemdNotifier(notify_socket.path)
    assert notifier.ready("up") and notifier.watchdog() and notifier.stopping()
    notify_socket.wait_for("STOPPING=1")
    assert notify_socket.messages == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_socket() -> None:
    listener = NotifySocket(f"@tether-test-{os.getpid()}")
    try:
        assert SystemdNotifier(listener.path).ready()
        listener.wait_for("READY=1")
    finally:
        listener.sock.close()


def test_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    assert not SystemdNotifier(str(tmp_path / "missing")).watchdog()


def test_ready_waits_for_readiness_then_pings_while_live(
    notify_socket: NotifySocket, health_server: str
) -> None:
    notifier = SystemdNotifier(notify_socket.path, watchdog_usec=200_000)
    watchdog = ReadinessWatchdog(notifier, health_server, poll_s=0.05, probe_timeout_s=1.0)
    watchdog.start()
    try:
        time.sleep(0.3)
        assert not watchdog.is_ready.is_set() and not notify_socket.messages
        Health.ready = True
        notify_socket.wait_for("READY=1")
        notify_socket.wait_for("WATCHDOG=1")
        Health.live = False
        time.sleep(0.3)
        notify_socket.messages.clear()
        time.sleep(0.5)
        with pytest.raises(AssertionError):
            notify_socket.wait_for("WATCHDOG=1", timeout_s=0.3)
    finally:
        watchdog.stop()


def test_gunicorn_hooks_probe_the_bound_socket(
    notify_socket: NotifySocket, health_server: str
) -> None:
    Health.ready = True
    _host, port = health_server.removeprefix("http://").split(":")
    sock = SimpleNamespace(getsockname=lambda: ("0.0.0.0", int(port)))
    server = SimpleNamespace(
        LISTENERS=[SimpleNamespace(sock=sock)], cfg=SimpleNamespace(is_ssl=False)
    )
    hooks = gunicorn_hooks({"NOTIFY_SOCKET": notify_socket.path}, os.getpid())
    hooks["when_ready"](server)
    notify_socket.wait_for("READY=1")
    hooks["on_exit"](server)
    notify_socket.wait_for("STOPPING=1")


def test_probe_urls() -> None:
    assert probe_base_url(("0.0.0.0", 8000)) == "http://127.0.0.1:8000"
    assert probe_base_url(("::", 8000, 0, 0), tls=True) == "https://[::1]:8000"
    assert probe_base_url(("10.0.0.5", 80)) == "http://10.0.0.5:80"


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_edge_agent_notifies_systemd(
    notify_socket: NotifySocket, tmp_path: Path, server: str
) -> None:
    """`tether edge` under a notify socket: one READY=1, once models are loaded, then pings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        NOTIFY_SOCKET=notify_socket.path,
        WATCHDOG_USEC="400000",
        TETHER_DATA_DIR=str(tmp_path / "data"),
        TETHER_HTTP__WORKERS="1",
        TETHER_HTTP__SERVER=server,
    )
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    log = tmp_path / "edge.log"
    tether = Path(sys.executable).with_name("tether")
    process = subprocess.Popen(
        [str(tether), "edge", "--port", str(port), "--repository", str(ROOT / "models" / "repository")],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )  # fmt: skip
    try:
        try:
            notify_socket.wait_for("READY=1", timeout_s=60)
        except AssertionError:
            process.kill()
            raise AssertionError(log.read_text()[-3000:]) from None
        notify_socket.wait_for("WATCHDOG=1")
        ready = next(m for m in notify_socket.messages if m.startswith("READY=1"))
        assert ready == f"READY=1\nSTATUS=serving on http://127.0.0.1:{port}"
        assert not any("Gunicorn arbiter booted" in m for m in notify_socket.messages)
    finally:
        process.terminate()
        process.wait(timeout=30)
    notify_socket.wait_for("STOPPING=1")
