"""``tether fleet status``: the fleet at a glance, with a progress bar per rollout.

Each rollout also says where its devices stand: **done** (finished with it: committed,
or confirmed rolled back once the rollout rolls back), **failed** (failed, refused,
rolled back on their own, timed out), and **pending** (everything else: waiting for their
wave, ordered, installing), of which how many are **offline** right now (their last will
or goodbye is the latest the fleet heard from them).
"""

from __future__ import annotations

from collections import Counter

from cloud.fleet_db import ACTIVE_STATES, FleetDB
from cloud.rollout import summarize

#: Device steps that count as done for a rollout's progress bar.
DONE_STEPS = frozenset({"active", "committed"})
#: Device steps that count as failed or undone.
BAD_STEPS = frozenset({"failed", "refused", "rolled_back", "timeout"})


def bar(done: int, total: int, width: int = 24) -> str:
    """``[##########--------------]  10/24``"""
    fraction = done / total if total else 0.0
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {done:>4}/{total}"


def device_counts(db: FleetDB, rollout_id: str, online: dict[str, bool]) -> dict[str, int]:
    """``done``, ``failed``, ``pending`` and ``offline`` (pending and offline now) devices."""
    rollout = db.rollout(rollout_id)
    undoing = rollout.state in ("aborting", "rolling_back", "rolled_back")
    counts = {"done": 0, "failed": 0, "pending": 0, "offline": 0}
    for device in db.rollout_devices(rollout_id):
        step = device.step or ""
        if step == ("rolled_back" if undoing else "committed"):
            counts["done"] += 1
        elif step in BAD_STEPS:
            counts["failed"] += 1
        else:
            counts["pending"] += 1
            counts["offline"] += not online.get(device.device, False)
    return counts


def render(db: FleetDB, recent: int = 5) -> list[str]:
    """The report: devices (online, versions per model) and the recent rollouts."""
    devices = db.list_devices()
    online = sum(1 for d in devices if d.online)
    online_by_name = {d.device: d.online for d in devices}
    lines = [f"Devices: {len(devices)} ({online} online, {len(devices) - online} offline)"]
    versions: dict[str, Counter[str]] = {}
    for device in devices:
        for model in device.models:
            active = device.active_version(model)
            versions.setdefault(model, Counter())[f"v{active}" if active else "none"] += 1
    for model, counts in sorted(versions.items()):
        spread = ", ".join(f"{v}: {n}" for v, n in sorted(counts.items()))
        lines.append(f"  {model:<24} {spread}")
    rollouts = sorted(db.list_rollouts(), key=lambda r: r.created_at, reverse=True)
    unfinished = [r for r in rollouts if r.state in ACTIVE_STATES]
    shown = unfinished + [r for r in rollouts if r not in unfinished][: max(0, recent)]
    lines += ["", f"Rollouts ({len(unfinished)} unfinished, {len(rollouts)} in all)"]
    if not shown:
        lines.append("  none yet: tether fleet rollout start MODEL VERSION --select LABELS")
    for rollout in shown:
        summary = summarize(db, rollout.id)
        steps: Counter[str] = Counter()
        for wave in summary["devices"].values():
            steps.update(wave)
        total = sum(steps.values())
        done = sum(n for step, n in steps.items() if step in DONE_STEPS)
        bad = sum(n for step, n in steps.items() if step in BAD_STEPS)
        lines.append(
            f"  {rollout.id:<36} {rollout.state:<12} wave {summary['wave']}/{summary['waves']} "
            f"{bar(done, total)}" + (f"  {bad} failed/undone" if bad else "")
        )
        where = device_counts(db, rollout.id, online_by_name)
        lines.append(
            f"      devices: {where['done']} done, {where['pending']} pending "
            f"({where['offline']} offline), {where['failed']} failed"
        )
        if rollout.reason:
            lines.append(f"      {rollout.reason}")
    return lines
