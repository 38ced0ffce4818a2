"""Running ``tether edge`` as a real process (as a user would) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.broker import free_port

ROOT = Path(__file__).resolve().parent.parent


class AgentProcess:
    """``python -m tether edge ...`` on a free loopback port."""

    def __init__(
        self,
        data_dir: Path,
        *,
        repository: Path | None = None,
        config: Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        grpc_port: int = 0,
        cwd: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        #: The gRPC API's port (0: off, the test default, so agents never share 8001).
        self.grpc_port = grpc_port
        self.data_dir = data_dir
        #: Where it runs: ``python -m tether`` imports the ``tether`` package found there
        #: first (another checkout, for a before/after comparison).
        self.cwd = cwd or ROOT
        self.command = [sys.executable, "-m", "tether", "edge", "--port", str(self.port)]
        self.command += ["--grpc-port", str(grpc_port)]
        if repository is not None:
            self.command += ["--repository", str(repository)]
        if config is not None:
            self.command += ["--config", str(config)]
        self.command += args or []
        self.env = {**os.environ, "TETHER_DATA_DIR": str(data_dir), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "agent.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 30.0) -> float:
        """Start and wait until ``/v2/health/ready`` answers 200; returns seconds taken."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=log, stderr=log, start_new_session=True
        )
        deadline = started + ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"agent not ready within {ready_timeout_s}s: {self.log()}")

    def pids(self) -> list[int]:
        """The server process and its worker processes."""
        assert self.process is not None
        out = subprocess.run(
            ["pgrep", "-s", str(self.process.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(p) for p in out.split()]

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
