"""A PostgreSQL server for the tests: the machine's own when it answers, else a private one.

CI machines run PostgreSQL on 127.0.0.1:5432 with trust auth and a database ``test``; a
fresh user machine may have only the server binaries (``make install`` installs them), so
the test session then starts a throw-away cluster of its own on a free port. The fleet
tests never skip PostgreSQL: with neither, they fail and say how to get one.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from harness.broker import free_port, wait_for_port

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PrivatePostgres:
    """``initdb`` + ``pg_ctl`` into a temporary folder, trust auth, database ``test``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tether-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
            try:
                pwd.getpwnam("postgres")
                self.user = "postgres"
            except KeyError as exc:
                raise RuntimeError("running as root and there is no postgres user") from exc
            shutil.chown(self.root, "postgres")

    def _run(self, *argv: str) -> None:
        command = list(argv)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/test"

    def start(self) -> PrivatePostgres:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError(
                "no PostgreSQL answers on 127.0.0.1:5432 and no server binaries are installed "
                "(`make install` installs them; or set TETHER_TEST_POSTGRES_URL)"
            )
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._run(
            pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
            "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1", "start",
        )  # fmt: skip
        wait_for_port(self.port)
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as conn:
            conn.execute("CREATE DATABASE test")
        return self

    def stop(self) -> None:
        pg_ctl = _bin("pg_ctl")
        if pg_ctl and self.data.exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(pg_ctl, "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def ensure_postgres() -> tuple[str, PrivatePostgres | None]:
    """The URL the tests use, and the private server to stop afterwards (if one started)."""
    configured = os.environ.get("TETHER_TEST_POSTGRES_URL")
    if configured:
        return configured, None
    if reachable(DEFAULT_URL):
        return DEFAULT_URL, None
    server = PrivatePostgres().start()
    return server.url, server
