"""``tether edge`` on each WSGI server it offers: real processes, real HTTP on loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from edge.http.server import forget_dead_workers
from harness.agent_process import ROOT, AgentProcess

REPOSITORY = ROOT / "models" / "repository"
BODY = json.dumps(
    {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [3.0] * 64}]}
).encode()


def infer(agent: AgentProcess) -> dict[str, object]:
    request = urllib.request.Request(
        agent.url + "/v2/models/digits-student/infer",
        data=BODY,
        headers={"Content-Type": "application/json", "Connection": "close"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())  # type: ignore[no-any-return]


def metrics(agent: AgentProcess) -> str:
    with urllib.request.urlopen(agent.url + "/metrics", timeout=10) as response:
        return response.read().decode()


def served(text: str) -> float:
    """Requests counted for digits-student, summed over every label set."""
    pattern = r'^tether_requests_total\{[^}]*model="digits-student"[^}]*\} ([\d.e+]+)$'
    return sum(float(m) for m in re.findall(pattern, text, re.M))


def workers_of(agent: AgentProcess) -> list[int]:
    assert agent.process is not None
    return [pid for pid in agent.pids() if pid != agent.process.pid]


@pytest.mark.parametrize("server", ["granian", "gunicorn"])
def test_each_server_serves_from_every_worker_with_one_set_of_metrics(
    tmp_path: Path, server: str
) -> None:
    agent = AgentProcess(
        tmp_path,
        repository=REPOSITORY,
        env={"TETHER_HTTP__SERVER": server, "TETHER_HTTP__WORKERS": "2"},
    )
    agent.start()
    try:
        assert len(workers_of(agent)) == 2
        for _ in range(40):
            answer = infer(agent)
            assert answer["model_name"] == "digits-student"
        # Every worker's counts land in the one /metrics, whichever worker answers it.
        assert served(metrics(agent)) == 40
    finally:
        agent.stop()
    log = agent.log_path.read_text()
    assert ("granian" in log) == (server == "granian"), "the chosen server runs"


def test_granian_restarts_a_killed_worker_and_forgets_its_gauges(tmp_path: Path) -> None:
    agent = AgentProcess(
        tmp_path,
        repository=REPOSITORY,
        env={"TETHER_HTTP__SERVER": "granian", "TETHER_HTTP__WORKERS": "2"},
    )
    agent.start()
    try:
        # Kill a worker once both are serving: granian shuts down altogether when a worker
        # dies while it is still starting the others (seen with granian 2.8.7).
        deadline = time.monotonic() + 30
        while agent.log_path.read_text().count("Started worker-") < 2:
            assert time.monotonic() < deadline, agent.log()
            time.sleep(0.05)
        before = workers_of(agent)
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = workers_of(agent)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"no new worker: {workers_of(agent)}\n{agent.log()}")
        for _ in range(10):
            infer(agent)
        # The new worker forgets its predecessor's live gauges as it starts.
        metrics_dir = tmp_path / "run" / "metrics"
        deadline = time.monotonic() + 30
        while list(metrics_dir.glob(f"gauge_live*_{victim}.db")):
            assert time.monotonic() < deadline, "the dead worker's gauges stay"
            time.sleep(0.1)
        assert "tether_model_ready" in metrics(agent)
    finally:
        agent.stop()


def test_forget_dead_workers_keeps_counters_and_live_gauges_of_the_living(
    tmp_path: Path,
) -> None:
    dead = 2**22 + 12345  # above any pid_max default: no such process
    names = [
        f"gauge_livemax_{dead}.db",
        f"counter_{dead}.db",
        f"gauge_livemax_{os.getpid()}.db",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    forget_dead_workers(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(names[1:]), "only the dead worker's live gauge goes"


def test_a_zombie_worker_counts_as_dead(tmp_path: Path) -> None:
    """A worker that exited but is not yet reaped (granian starts the new one first)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        (tmp_path / f"gauge_livemax_{pid}.db").write_bytes(b"")
        forget_dead_workers(tmp_path)
        assert not list(tmp_path.iterdir())
    finally:
        os.waitpid(pid, 0)
