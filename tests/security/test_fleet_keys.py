"""Keys and credentials of the fleet service, as real processes run them.

* `tether fleet serve` runs the artifact server (granian) in a child process that never
  gets the signing key; the controller in the parent signs orders with it.
* `tether fleet controller` refuses to start without a configured key (no silent
  development key); `--check-alive` follows its heartbeat.
* Processes that log a broker or database URL log it without the password.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.broker import Broker, free_port
from shared.manifest import generate_key, public_key_text, save_private_key
from tests.conftest import ROOT

SECRET = "hunter2-never-logged"


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            kids = [int(k) for task in tasks for k in (task / "children").read_text().split()]
        except OSError:
            continue
        found += kids
        todo += kids
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def wait_until(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def fleet_env(tmp_path: Path, broker: Broker) -> dict[str, str]:
    key = generate_key()
    save_private_key(key, tmp_path / "signing.pem")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    host, port = broker.url.removeprefix("mqtt://").split(":")
    return {
        **env,
        "TETHER_MQTT_URL": f"mqtt://fleet-controller:{SECRET}@{host}:{port}",
        "TETHER_FLEET_DATA_DIR": str(tmp_path / "fleet"),
        "TETHER_FLEET_SIGNING_KEY": str(tmp_path / "signing.pem"),
        "TETHER_FLEET_HTTP_PORT": str(free_port()),
        "TETHER_FLEET_HTTP_WORKERS": "1",
        "TETHER_FLEET_TICK_S": "0.2",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture
def serve(fleet_env: dict[str, str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "tether", "fleet", "serve"],
        cwd=ROOT,
        env=fleet_env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    yield process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log.close()


def test_the_artifact_server_never_gets_the_signing_key(
    serve: subprocess.Popen[bytes], fleet_env: dict[str, str], tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{fleet_env['TETHER_FLEET_HTTP_PORT']}"
    wait_until(lambda: http_ok(f"{base}/healthz"), 60, "the artifact server")
    # The controller (this process) has the key; every process serving HTTP does not.
    assert environ(serve.pid)["TETHER_FLEET_SIGNING_KEY"] == fleet_env["TETHER_FLEET_SIGNING_KEY"]
    servers = children(serve.pid)
    assert servers, "the artifact server runs as a child process"
    for pid in servers:
        assert "TETHER_FLEET_SIGNING_KEY" not in environ(pid), pid
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") for pid in servers]
    assert [b"fleet", b"artifacts"] in [c[-3:-1] for c in commands]
    # It is granian answering, not Werkzeug's development server.
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as response:
        assert response.headers.get("Server") == "granian"
    # The controller's loop is alive, as the deploy health checks see it.
    check = [sys.executable, "-m", "tether", "fleet", "controller", "--check-alive"]
    wait_until(
        lambda: subprocess.run(check, env=fleet_env, cwd=ROOT, check=False).returncode == 0,
        30,
        "the controller's heartbeat",
    )
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=30) == 0
    for pid in servers:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        ), f"artifact server process {pid} outlived `fleet serve`"
    log = (tmp_path / "serve.log").read_text()
    assert SECRET not in log, "a password reached the log"
    assert "fleet-controller:***@" in log


def test_the_controller_refuses_to_run_without_a_key(fleet_env: dict[str, str]) -> None:
    env = {k: v for k, v in fleet_env.items() if k != "TETHER_FLEET_SIGNING_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "tether", "fleet", "controller"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "no fleet signing key" in result.stderr
    assert not (Path(fleet_env["TETHER_FLEET_DATA_DIR"]) / "keys").exists()
    check = [sys.executable, "-m", "tether", "fleet", "controller", "--check-alive"]
    assert subprocess.run(check, env=env, cwd=ROOT, check=False).returncode == 1


def test_the_fleet_agent_logs_its_broker_without_the_password(
    tmp_path: Path, broker: Broker
) -> None:
    """Provisioning puts the device's password into TETHER_MQTT_URL; the agent's log shows
    the URL with ``***`` instead."""
    config = tmp_path / "edge.toml"
    config.write_text(
        f'repository = "{tmp_path / "repository"}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[fleet]\ntrusted_keys = ["{public_key_text(generate_key())}"]\n'
    )
    host, port = broker.url.removeprefix("mqtt://").split(":")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TETHER_")},
        "TETHER_DEVICE_ID": "cam-17",
        "TETHER_MQTT_URL": f"mqtt://cam-17:{SECRET}@{host}:{port}",
        "PYTHONUNBUFFERED": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tether", "fleet-agent", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if "running (broker" in line:
                break
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    assert "running (broker mqtt://cam-17:***@" in output, output[-2000:]
    assert SECRET not in output
