"""The failure budget, with and without a minimum number of executed devices; the rollout
rate; the health gate's minimum evidence."""

from __future__ import annotations

import time
from pathlib import Path

from click.testing import CliRunner

from cloud.fleet_db import FleetDB
from cloud.rollout_policy import (
    RolloutPolicy,
    failure_budget,
    health_verdict,
    order_allowance,
)
from harness.fleet import make_version
from shared.fleet import DeviceStatus, HealthReport
from tether.cli import cli


def test_a_share_of_the_ordered_devices_by_default() -> None:
    policy = RolloutPolicy(waves=["100%"], max_failure="10%")
    assert failure_budget(policy, ordered=20, executed=1) == 2
    assert failure_budget(policy, ordered=1, executed=1) == 0  # the canary alone: no slack


def test_with_min_executed_a_share_of_the_finished_once_enough_finished() -> None:
    policy = RolloutPolicy(waves=["100%"], max_failure="20%", min_executed=10)
    assert failure_budget(policy, ordered=1, executed=1) is None  # one failed canary: no verdict
    assert failure_budget(policy, ordered=50, executed=9) is None
    assert failure_budget(policy, ordered=50, executed=10) == 2
    assert failure_budget(policy, ordered=50, executed=40) == 8
    absolute = RolloutPolicy(waves=["100%"], max_failure="3", min_executed=5)
    assert failure_budget(absolute, ordered=9, executed=5) == 3


def test_the_rollout_rate_paces_orders_and_grows_on_success() -> None:
    unlimited = RolloutPolicy(waves=["100%"])
    assert order_allowance(unlimited, None, 0, 0, now=0.0) is None
    paced = RolloutPolicy(waves=["100%"], rate_per_minute=60)
    assert order_allowance(paced, None, 0, 0, now=100.0) == 1  # the first one at once
    assert order_allowance(paced, 100.0, 1, 0, now=100.5) == 0
    assert order_allowance(paced, 100.0, 1, 0, now=110.0) == 10  # one a second
    growing = RolloutPolicy(waves=["100%"], rate_per_minute=60, rate_growth=2, growth_every=5)
    assert order_allowance(growing, 100.0, 11, 4, now=110.0) == 0
    assert order_allowance(growing, 100.0, 11, 5, now=110.0) == 10  # two a second now
    assert order_allowance(growing, 100.0, 11, 10, now=110.0) == 30  # four a second


def test_the_health_gate_never_passes_on_no_evidence() -> None:
    policy = RolloutPolicy(waves=["100%"], min_requests=50, min_shadow_samples=10)
    good = HealthReport(
        requests=30,
        shadow_samples=6,
        shadow_agreement=0.97,
        baseline_shadow_agreement=0.97,
        baseline_shadow_samples=10,
        baseline_error_rate=0.0,
    )
    assert health_verdict([good, good], policy) is None  # 60 requests, 12 samples
    no_reports = health_verdict([], policy)
    assert no_reports is not None and "no evidence: 0 requests" in no_reports
    idle = health_verdict([HealthReport(), HealthReport()], policy)
    assert idle is not None and "min_requests 50" in idle
    few = health_verdict([good], policy)
    assert few is not None and "30 requests" in few
    unsampled = good.model_copy(update={"requests": 100, "shadow_samples": 0})
    verdict = health_verdict([unsampled], policy)
    assert verdict is not None and "no evidence: 0 shadow samples" in verdict
    # Without shadow sampling (or without the agreement check) no samples are needed.
    assert health_verdict([unsampled], RolloutPolicy(["100%"], shadow_sample_rate=0.0)) is None
    assert health_verdict([unsampled], RolloutPolicy(["100%"], max_agreement_drop=None)) is None


def test_the_agreement_gate_never_passes_without_baseline_samples() -> None:
    """The agreement is compared with the previous version's: without shadow samples behind
    that baseline (none measured, or a 1.0/1.1 report that cannot say how many) the gate
    has nothing to compare with, and fails."""
    policy = RolloutPolicy(waves=["100%"], min_baseline_samples=10)
    measured = HealthReport(
        requests=100,
        shadow_samples=20,
        shadow_agreement=0.97,
        baseline_shadow_agreement=0.97,
        baseline_shadow_samples=12,
    )
    assert health_verdict([measured], policy) is None
    unmeasured = measured.model_copy(update={"baseline_shadow_agreement": None})
    verdict = health_verdict([unmeasured], policy)
    assert verdict is not None and "no evidence: 0 baseline shadow samples" in verdict
    assert "min_baseline_samples 10" in verdict
    old = HealthReport.parse({**measured.dump(), "schema_version": "1.1"})
    old = old.model_copy(update={"baseline_shadow_samples": None})  # a 1.1 device sent none
    verdict = health_verdict([old, old], policy)
    assert verdict is not None and "0 baseline shadow samples" in verdict
    few = measured.model_copy(update={"baseline_shadow_samples": 4})
    assert health_verdict([few, few], policy) is not None
    assert health_verdict([few, few, few], policy) is None  # 12 over three devices
    # The baseline weighs by its own samples: 90 samples at 99% outweigh 10 at 50%, so an
    # agreement of 85% is a drop of 9 points (weighed by the new version's samples, the
    # baseline would read 74.5% and hide it).
    strong = measured.model_copy(
        update={
            "shadow_agreement": 0.85,
            "baseline_shadow_agreement": 0.99,
            "baseline_shadow_samples": 90,
        }
    )
    weak = strong.model_copy(
        update={"baseline_shadow_agreement": 0.5, "baseline_shadow_samples": 10}
    )
    verdict = health_verdict([strong, weak], policy)
    assert verdict is not None and "fell to 85.0% from 94.1%" in verdict, verdict
    # No agreement check, or no shadow sampling: no baseline needed.
    assert health_verdict([old], RolloutPolicy(["100%"], max_agreement_drop=None)) is None
    assert health_verdict([old], RolloutPolicy(["100%"], shadow_sample_rate=0.0)) is None
    assert health_verdict([old], RolloutPolicy(["100%"], min_baseline_samples=0)) is None


def test_rollout_start_takes_the_evidence_minimums(tmp_path: Path) -> None:
    """``--min-baseline-samples`` (and its neighbours) reach the stored rollout policy."""
    runner = CliRunner()
    data = tmp_path / "data"
    base = ["fleet", "--data-dir", str(data)]
    env = {"TETHER_FLEET_SIGNING_KEY": str(tmp_path / "k.pem")}
    assert runner.invoke(cli, [*base, "keygen", str(tmp_path / "k.pem")]).exit_code == 0
    folder = make_version(tmp_path / "repo", "digits", 2)
    result = runner.invoke(cli, [*base, "publish", str(folder)], env=env)
    assert result.exit_code == 0, result.output
    db = FleetDB(f"sqlite:///{data}/fleet.db")
    for name in ("cam-1", "cam-2"):
        status = DeviceStatus(online=True, labels={"site": name})
        db.upsert_device(name, status, seen_at=time.time())
    start = [*base, "rollout", "start", "digits", "2"]
    result = runner.invoke(cli, [*start, "--select", "site=cam-1", "--min-baseline-samples", "7"])
    assert result.exit_code == 0, result.output
    chosen = db.rollout(result.output.split()[1]).policy
    assert (chosen.min_baseline_samples, chosen.min_shadow_samples) == (7, 1)
    result = runner.invoke(cli, [*start, "--select", "site=cam-2"])
    assert result.exit_code == 0, result.output
    assert db.rollout(result.output.split()[1]).policy.min_baseline_samples == 1
    result = runner.invoke(cli, [*start, "--select", "site=cam-1", "--min-baseline-samples", "-1"])
    assert result.exit_code != 0
