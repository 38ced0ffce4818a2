"""A real Mosquitto broker for tests: started on a free loopback port, killable, restartable."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: Where :func:`free_port` looks when the kernel's ephemeral range cannot be read.
DEFAULT_EPHEMERAL_LOW = 32768
LOWEST_PORT = 10000


def ephemeral_low() -> int:
    """The first port of the kernel's range for outgoing connections' local ports."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_LOW


def free_port() -> int:
    """A loopback TCP port that is free now, chosen below the kernel's ephemeral range.

    A server started later binds it, so something else may take it in between. A port
    from the ephemeral range (what binding port 0 returns) can be taken by any outgoing
    connection on the machine, and a loaded test machine makes thousands (a fleet
    service once failed with "address already in use" that way); below the range, only
    another server that picked the same number at random can take it.
    """
    high = max(LOWEST_PORT + 1000, ephemeral_low()) - 1
    for _ in range(1000):
        port = random.randint(LOWEST_PORT, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {LOWEST_PORT} and {high}")


def wait_for_port(port: int, timeout_s: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


#: The configurations a test broker can run: Tether's tuned one, or a stock Mosquitto 2.0
#: as users run it (only a listener; every other setting at Mosquitto's default, e.g.
#: Nagle's algorithm on and at most 1000 queued messages per client).
BROKER_KINDS = ("tuned", "stock")


class Broker:
    """One ``mosquitto`` process with a generated config (or a given one).

    ``stock=True`` writes only ``listener PORT 127.0.0.1`` and ``allow_anonymous true``
    (plus ``extra_config``): the configuration a user's broker most likely has.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra_config: str = "",
        stock: bool = False,
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (make install-broker)")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.stock = stock
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def kind(self) -> str:
        return "stock" if self.stock else "tuned"

    def config_text(self) -> str:
        if self.stock:
            return f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{self.extra_config}\n"
        return (
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "persistence false\n"
            f"{self.extra_config}\n"
        )

    def start(self) -> Broker:
        config = self.workdir / f"mosquitto-{self.port}.conf"
        config.write_text(self.config_text())
        log = open(self.workdir / f"mosquitto-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen([self.binary, "-c", str(config)], stdout=log, stderr=log)
        wait_for_port(self.port)
        return self

    def kill(self) -> None:
        """SIGKILL the broker (connections drop without a clean disconnect)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
