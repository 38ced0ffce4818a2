"""The one rollout health gate: a device judging its window and the controller judging a
wave reach the same verdict, with the same reason, on the same figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.rollout_policy import RolloutPolicy, health_verdict
from edge.fleet.context import FleetContext
from edge.fleet.health_window import HealthWindow
from edge.fleet.state import ModelState
from edge.health import LATENCY_BOUNDS_MS, HealthCounters
from edge.settings import load_settings
from shared.fleet import HealthReport
from shared.health_gate import HealthThresholds, health_gate


def _counters(requests: int, errors: int = 0, *, latency_ms: float = 1.0) -> HealthCounters:
    buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
    bucket = next(i for i, bound in enumerate(LATENCY_BOUNDS_MS) if bound >= latency_ms)
    buckets[bucket] = requests - errors
    return HealthCounters(requests=requests, errors=errors, buckets=tuple(buckets))


class _Figures:
    """A health source with set counters per version."""

    def __init__(self, counters: dict[int, HealthCounters]) -> None:
        self.figures = counters

    def counters(self, model: str, version: str) -> HealthCounters:
        return self.figures.get(int(version), HealthCounters())


class _NoTarget:
    def serve(self, name: str, version: int) -> None: ...

    def unload(self, name: str) -> None: ...

    def current(self, name: str) -> int | None:
        return None


def _policy(**limits: float) -> RolloutPolicy:
    """A rollout's gate on error rate and latency alone (no shadow sampling)."""
    return RolloutPolicy(["100%"], shadow_sample_rate=0.0, **limits)  # type: ignore[arg-type]


def _device_verdict(
    tmp_path: Path, previous: HealthCounters | None, new: HealthCounters, **fleet: object
) -> tuple[str | None, HealthReport]:
    """How a device's health window ends for version 2 replacing version 1."""
    settings = load_settings(
        None,
        device_id="dev-1",
        data_dir=tmp_path / "data",
        repository=tmp_path / "repository",
        fleet={"trusted_keys": [], "min_requests": 1, **fleet},
    )
    ctx = FleetContext(settings, _NoTarget(), step_hook=None, clock=lambda: 1000.0)
    figures = _Figures({} if previous is None else {1: previous})
    window = HealthWindow(ctx, figures, None)
    window.open("digits", HealthCounters(), previous)
    figures.figures[2] = new
    st = ModelState(active=2, previous=1, phase="active", activated_at=0.0, health_window_s=60)
    judgement = window.judge("digits", st)
    assert judgement is not None
    return judgement.failure, judgement.report


def test_a_version_worse_than_its_baseline_by_more_than_the_limit_fails_on_both_sides(
    tmp_path: Path,
) -> None:
    # The previous version failed 2% of its requests; the new one fails 10%: 8 points more
    # than the baseline, over a 5-point limit.
    failure, report = _device_verdict(
        tmp_path, _counters(100, 2), _counters(100, 10), max_error_rate=0.05
    )
    controller = health_verdict([report], _policy(max_error_rate=0.05))
    expected = "error rate 10.00% exceeds the previous version's 2.00% by more than 5.00%"
    assert controller == expected
    assert failure == f"unhealthy: {expected}"


def test_a_version_within_the_limit_of_its_baseline_passes_on_both_sides(
    tmp_path: Path,
) -> None:
    # 6% errors is over the 5% limit as an absolute figure, but only 4 points more than
    # the previous version's 2%: the limit is on the excess, on the device as in the cloud.
    failure, report = _device_verdict(
        tmp_path, _counters(100, 2), _counters(100, 6), max_error_rate=0.05
    )
    assert failure is None
    assert health_verdict([report], _policy(max_error_rate=0.05)) is None


def test_without_a_baseline_the_error_limit_is_absolute(tmp_path: Path) -> None:
    failure, report = _device_verdict(tmp_path, None, _counters(100, 6), max_error_rate=0.05)
    assert failure is not None and failure.startswith("unhealthy: error rate 6.00% exceeds 5.00%")
    controller = health_verdict([report], _policy(max_error_rate=0.05))
    assert controller is not None and failure == f"unhealthy: {controller}"
    passed, _ = _device_verdict(tmp_path, None, _counters(100, 4), max_error_rate=0.05)
    assert passed is None


def test_a_slower_version_fails_by_the_same_p99_ratio_on_both_sides(tmp_path: Path) -> None:
    failure, report = _device_verdict(
        tmp_path,
        _counters(100, latency_ms=10.0),
        _counters(100, latency_ms=50.0),
        max_p99_ratio=2.0,
    )
    controller = health_verdict([report], _policy(max_p99_ratio=2.0))
    assert controller is not None and controller.startswith("p99 latency is 5.00x")
    assert failure == f"unhealthy: {controller}"


@pytest.mark.parametrize(
    "reports",
    [
        [],
        [HealthReport()],
        [HealthReport(requests=3, errors=3, p99_ms=900.0, baseline_p99_ms=1.0)],
    ],
)
def test_no_evidence_never_passes(reports: list[HealthReport]) -> None:
    """Too few requests (none, or fewer than the minimum) fail, whatever they show, and say
    so: a gate that passed on nothing would pass any version to an idle fleet."""
    limits = HealthThresholds(max_error_rate=1.0, max_p99_ratio=1000.0, min_requests=5)
    verdict = health_gate(reports, limits, shadowed=False)
    assert verdict is not None and verdict.evidence_missing
    assert verdict.reason.startswith("no evidence: ") and "(min_requests 5)" in verdict.reason
    shadowed = HealthThresholds(min_requests=1, min_shadow_samples=1, max_agreement_drop=0.05)
    unsampled = [HealthReport(requests=10)]
    verdict = health_gate(unsampled, shadowed, shadowed=True)
    assert verdict is not None and verdict.evidence_missing
    assert "0 shadow samples" in verdict.reason


def test_a_device_without_evidence_holds_its_window_then_rolls_back(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        device_id="dev-1",
        data_dir=tmp_path / "data",
        repository=tmp_path / "repository",
        fleet={"trusted_keys": [], "min_requests": 5, "evidence_timeout_s": 30.0},
    )
    now = [70.0]
    ctx = FleetContext(settings, _NoTarget(), step_hook=None, clock=lambda: now[0])
    window = HealthWindow(ctx, _Figures({2: _counters(3)}), None)
    window.open("digits", HealthCounters(), None)
    st = ModelState(active=2, previous=1, phase="active", activated_at=0.0, health_window_s=60)
    assert window.judge("digits", st) is None  # waiting for evidence
    now[0] = 91.0
    judgement = window.judge("digits", st)
    assert judgement is not None
    assert judgement.failure == (
        "unhealthy: no evidence: 3 requests recorded (min_requests 5) within 30s"
    )


def test_agreement_floor_and_drop_each_keep_their_meaning() -> None:
    report = HealthReport(
        requests=100,
        shadow_samples=50,
        shadow_agreement=0.80,
        baseline_shadow_agreement=0.95,
        baseline_shadow_samples=50,
    )
    # An absolute floor (the device's min_shadow_agreement): 80% is above 70%.
    assert health_gate([report], HealthThresholds(min_agreement=0.7), shadowed=True) is None
    floor = health_gate([report], HealthThresholds(min_agreement=0.9), shadowed=True)
    assert floor is not None and "80.0% is under 90.0%" in floor.reason
    # A drop from the previous version's (the controller's max_agreement_drop): 15 points.
    drop = health_gate([report], HealthThresholds(max_agreement_drop=0.1), shadowed=True)
    assert drop is not None and "fell to 80.0% from 95.0%" in drop.reason
    assert health_gate([report], HealthThresholds(max_agreement_drop=0.2), shadowed=True) is None
