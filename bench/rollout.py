"""Rollout benchmark (run by hand, not in CI).

``python bench/rollout.py --sizes 1000,10000 --database postgresql``

Processes, as in a deployment: one Mosquitto (its open-file limit raised to the hard limit,
one descriptor per device), the artifact server under gunicorn (2 workers x 16 threads),
the simulated fleet (``harness/fleet_swarm.py``: asyncio devices over aiomqtt, ``--processes``
processes; each device has its own MQTT connection with a retained status and a last
will, verifies the signed manifest, downloads a 32 KiB artifact in two Range requests
and checks its sha256), and this process: the fleet database client, registry and the
rollout controller (0.05 s tick), whose CPU time and peak RSS are reported.

For each fleet size:

1. a good rollout, waves ``1,10%,50%,100%``, no health window: start -> completed, and
   the time each wave was ordered;
2. a bad canary (self-test fails): start -> rolled back;
3. fleet-wide abort: a rollout to 100 % held in a long health window, then aborted:
   abort -> every device confirmed ``rolled_back``.

Writes a Markdown table to stdout and ``bench/results/rollout.md``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.artifacts import ArtifactStore
from cloud.fleet_db import FleetDB
from cloud.registry import Registry
from cloud.rollout import RolloutController, request_abort, start_rollout
from harness.broker import Broker, free_port, wait_for_port
from harness.fleet import make_version, open_db, policy, wait_for
from harness.fleet_sim import Behaviour
from harness.fleet_swarm import Swarm, raise_open_files_limit
from shared.manifest import generate_key, public_key_text
from shared.mqtt import MqttClient

WAVES = ["1", "10%", "50%", "100%"]


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    """One fleet of ``size`` devices with everything the cloud side runs."""

    def __init__(self, broker: Broker, db: FleetDB, workdir: Path, size: int, processes: int):
        self.db = db
        self.workdir = workdir
        self.size = size
        self.key = generate_key()
        store = ArtifactStore(workdir / "artifacts")
        port = free_port()
        self.artifacts = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "gunicorn"),
                "-w",
                "2",
                "--threads",
                "16",
                "-b",
                f"127.0.0.1:{port}",
                "--timeout",
                "120",
                "--backlog",
                "4096",
                "--log-level",
                "warning",
                f"cloud.artifacts:create_app('{store.root}')",
            ],
            cwd=Path(__file__).resolve().parent.parent,
        )
        try:
            self._start(broker, db, store, port, size, processes)
        except BaseException:
            if hasattr(self, "swarm"):
                self.swarm.stop()
            if hasattr(self, "controller"):
                self.controller.stop()
            self.artifacts.terminate()
            raise

    def _start(
        self,
        broker: Broker,
        db: FleetDB,
        store: ArtifactStore,
        port: int,
        size: int,
        processes: int,
    ) -> None:
        wait_for_port(port, 60)
        self.registry = Registry(db, store, f"http://127.0.0.1:{port}")
        self.mqtt = MqttClient(broker.url, f"bench-controller-{size}")
        self.mqtt.start()
        self.controller = RolloutController(db, self.mqtt, signing_key=self.key, tick_s=0.05)
        self.controller.start()
        self.run = f"b{size}"
        started = time.monotonic()
        self.swarm = Swarm(
            broker.url,
            [public_key_text(self.key)],
            size,
            processes=processes,
            prefix=self.run,
            labels={"bench": self.run},
        )
        connected = self.swarm.connect()
        self.reconnects, last_error = self.swarm.reconnects()
        assert connected == size, f"only {connected} of {size} devices connected: {last_error}"
        self.selector = {"bench": self.run}
        deadline = time.monotonic() + 600
        while len(db.list_devices(self.selector)) < size:  # a full read: poll gently
            assert time.monotonic() < deadline, "not every device's status was recorded"
            time.sleep(1.0)
        self.connect_s = time.monotonic() - started
        self.version = 2

    def publish(self) -> int:
        version = self.version
        self.registry.publish(make_version(self.workdir / "repo", "digits", version), self.key)
        self.version += 1
        return version

    def wait_state(self, rollout_id: str, timeout_s: float = 900) -> str:
        wait_for(
            lambda: self.db.rollout(rollout_id).state in ("completed", "rolled_back"),
            timeout_s,
            "the rollout to finish",
        )
        return self.db.rollout(rollout_id).state

    def good_rollout(self) -> tuple[float, list[float]]:
        """Seconds start -> completed, and when each wave was ordered (from start)."""
        version = self.publish()
        started = time.monotonic()
        rollout, _ = start_rollout(
            self.db,
            "digits",
            version,
            self.selector,
            policy(waves=WAVES, window_s=0.0, device_timeout_s=300),
        )
        waves: list[float] = []
        while True:
            record = self.db.rollout(rollout.id)
            if record.wave_started_at is not None and len(waves) <= record.wave:
                waves.append(time.monotonic() - started)
            if record.state in ("completed", "rolled_back"):
                break
            time.sleep(0.05)
        assert record.state == "completed", record.reason
        return time.monotonic() - started, waves

    def bad_canary(self) -> float:
        self.swarm.behave(Behaviour(self_test_fails=True))
        version = self.publish()
        started = time.monotonic()
        rollout, _ = start_rollout(
            self.db, "digits", version, self.selector, policy(waves=WAVES, device_timeout_s=300)
        )
        assert self.wait_state(rollout.id) == "rolled_back"
        elapsed = time.monotonic() - started
        self.swarm.behave(Behaviour())
        return elapsed

    def fleet_wide_abort(self) -> float:
        version = self.publish()
        rollout, _ = start_rollout(
            self.db,
            "digits",
            version,
            self.selector,
            policy(waves=["100%"], window_s=3600, device_timeout_s=300),
        )
        deadline = time.monotonic() + 900
        while (
            sum(1 for r in self.db.rollout_devices(rollout.id, health=False) if r.step == "active")
            < self.size
        ):
            assert time.monotonic() < deadline, "not every device became active"
            time.sleep(0.5)
        started = time.monotonic()
        request_abort(self.db, rollout.id)
        assert self.wait_state(rollout.id) == "rolled_back"
        return time.monotonic() - started

    def close(self) -> None:
        self.swarm.stop()
        self.controller.stop()
        self.mqtt.stop()
        self.artifacts.terminate()
        self.artifacts.wait(timeout=30)


def measure(bench: Bench) -> dict[str, str]:
    cpu0 = cpu_s()
    good, waves = bench.good_rollout()
    cpu_good = cpu_s() - cpu0
    canary = bench.bad_canary()
    abort = bench.fleet_wide_abort()
    return {
        "devices connected and known (s)": f"{bench.connect_s:.1f}",
        "  connections refused or lost and retried while connecting": f"{bench.reconnects}",
        "good rollout, waves 1,10%,50%,100%: start -> completed (s)": f"{good:.2f}",
        "  waves ordered at (s)": " / ".join(f"{w:.1f}" for w in waves),
        "bad canary (self-test fails): start -> rolled back (s)": f"{canary:.2f}",
        "fleet-wide abort (all active) -> all confirmed (s)": f"{abort:.2f}",
        "controller process CPU during the good rollout (s)": f"{cpu_good:.1f}",
        "controller process peak RSS (MB)": f"{peak_rss_mb():.0f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="postgresql")
    parser.add_argument("--processes", type=int, default=4, help="simulator processes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    raise_open_files_limit()  # Mosquitto inherits it: one descriptor per device
    sizes = [int(s) for s in args.sizes.split(",")]
    table: dict[int, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for size in sizes:
            broker = Broker(workdir / f"broker{size}").start()
            db = open_db(args.database, workdir / f"db{size}")
            bench = Bench(broker, db, workdir / f"fleet{size}", size, args.processes)
            try:
                table[size] = measure(bench)
                print(size, table[size], flush=True)
            finally:
                bench.close()
                db.drop_schema()
                db.close()
                broker.stop()
    rows = list(next(iter(table.values())))
    lines = [
        f"Rollout bench, {args.database}, controller tick 0.05 s, no health window, "
        f"{args.processes} simulator processes",
        "",
        "| | " + " | ".join(f"{s:,} devices" for s in sizes) + " |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(table[s][row] for s in sizes) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "rollout.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
