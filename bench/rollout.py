"""Rollout benchmark (run by hand, not in CI): ``python bench/rollout.py [--sizes 200,1000]``.

One process runs one Mosquitto, the artifact server, the fleet database (SQLite by
default, ``--database postgresql`` for the test PostgreSQL) and the rollout controller
(0.02 s tick), plus N simulated devices (``tests/fleet_sim.py``: one MQTT connection each,
manifest verification, a two-part Range download of a 32 KiB artifact, sha256 check).
For each fleet size it measures:

1. a good rollout with no health window, waves ``1,10%,50%,100%``: start -> completed;
2. the same in one wave (``100%``): start -> completed;
3. a bad canary (self-test failure), waves ``1,10%,50%,100%``: start -> rolled_back;
4. fleet-wide rollback: a rollout to 100% held in a long health window, then aborted:
   abort -> every device confirmed ``rolled_back``.

Writes a Markdown table to stdout and ``bench/results/rollout.md``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.rollout import request_abort, start_rollout
from tests.broker import Broker
from tests.cloud.fleet_harness import FleetHarness, open_db, policy, wait_for
from tests.fleet_sim import Behaviour


def measure(harness: FleetHarness, size: int) -> dict[str, float]:
    """Seconds for each scenario on a fleet of ``size`` devices (fresh versions each)."""
    results: dict[str, float] = {}
    devices = harness.add_devices(size, labels={"bench": str(size)})
    selector = harness.sel(bench=str(size))
    version = 2

    for name, waves in (
        ("waves 1,10%,50%,100%", ["1", "10%", "50%", "100%"]),
        ("one wave", ["100%"]),
    ):
        harness.publish("digits", version)
        started = time.monotonic()
        rollout, _ = start_rollout(
            harness.db,
            "digits",
            version,
            selector,
            policy(waves=waves, window_s=0.0, device_timeout_s=60),
        )
        assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 300) == "completed"
        results[f"good rollout, {name}"] = time.monotonic() - started
        version += 1

    harness.publish("digits", version)
    for device in devices:
        device.behaviour = Behaviour(self_test_fails=True)
    started = time.monotonic()
    rollout, _ = start_rollout(harness.db, "digits", version, selector, policy(device_timeout_s=60))
    assert harness.wait_state(rollout.id, {"completed", "rolled_back"}, 300) == "rolled_back"
    results["bad canary -> rolled back"] = time.monotonic() - started
    version += 1

    for device in devices:
        device.behaviour = Behaviour()
    harness.publish("digits", version)
    rollout, _ = start_rollout(
        harness.db,
        "digits",
        version,
        selector,
        policy(waves=["100%"], window_s=600, device_timeout_s=60),
    )
    wait_for(
        lambda: (
            sum(1 for r in harness.db.rollout_devices(rollout.id) if r.step == "active") == size
        ),
        300,
        "every device to be active",
    )
    started = time.monotonic()
    request_abort(harness.db, rollout.id)
    assert harness.wait_state(rollout.id, {"rolled_back"}, 300) == "rolled_back"
    results["fleet-wide abort -> all rolled back"] = time.monotonic() - started
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="200,1000")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    sizes = [int(s) for s in args.sizes.split(",")]
    table: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        broker = Broker(workdir / "broker").start()
        try:
            for size in sizes:
                db = open_db(args.database, workdir / f"db{size}")
                harness = FleetHarness(broker.url, db, workdir / f"h{size}")
                try:
                    table[size] = measure(harness, size)
                    print(size, table[size], flush=True)
                finally:
                    harness.close()
                    db.drop_schema()
                    db.close()
        finally:
            broker.stop()
    rows = list(next(iter(table.values())))
    lines = [
        f"Rollout timings (s), {args.database}, controller tick 0.02 s, no health window",
        "",
        "| scenario | " + " | ".join(f"{s} devices" for s in sizes) + " |",
        "| --- | " + " | ".join("---:" for _ in sizes) + " |",
    ]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{table[s][row]:.2f}" for s in sizes) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "rollout.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
