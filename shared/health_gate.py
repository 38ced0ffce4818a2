"""The rollout health gate: one judgement of a new model version, on the device and in
the controller alike.

A device judges its own health report at the end of its health window (fleet agent
settings ``fleet.*``); the controller judges the reports of a wave's committed devices
(the rollout's policy). Both call :func:`health_gate`, so each threshold means one thing:

* ``max_error_rate``: how far the new version's error rate (errors / requests, over all
  reports) may exceed its baseline's, the previous version's error rate (request-weighted
  over the reports that know it). With no baseline known it is compared with 0, so on a
  device that served nothing before it is an absolute limit.
* ``max_p99_ratio``: the highest ``p99_ms / baseline_p99_ms`` (the median over reports);
  a report with fewer than :data:`P99_MIN_REQUESTS` requests, or without both numbers, is
  left out (a p99 of a handful of requests is the slowest one).
* ``min_agreement``: the lowest top-1 agreement with the cloud teacher (sample-weighted),
  an absolute floor.
* ``max_agreement_drop``: how far that agreement may fall below the previous version's
  (``baseline_shadow_agreement``, weighted by ``baseline_shadow_samples``).

Evidence comes first, and no gate passes on none: fewer than ``min_requests`` requests,
or, when shadow samples are expected, fewer than ``min_shadow_samples`` of them, or (when
the agreement drop is checked) fewer than ``min_baseline_samples`` behind the baseline,
is a verdict with ``evidence_missing`` set. The device holds its window for more; the
controller fails the wave. A ``None`` threshold is not checked.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from shared.fleet import HealthReport

#: A report's p99 counts for ``max_p99_ratio`` only over at least this many requests.
P99_MIN_REQUESTS = 20
#: Slack for float sums, so a figure exactly at its limit passes.
_EPSILON = 1e-12


@dataclass(frozen=True)
class HealthThresholds:
    """The limits of the gate (see the module's docstring for each one's meaning)."""

    max_error_rate: float | None = None
    max_p99_ratio: float | None = None
    min_agreement: float | None = None
    max_agreement_drop: float | None = None
    min_requests: int = 0
    min_shadow_samples: int = 0
    min_baseline_samples: int = 0


@dataclass(frozen=True)
class GateVerdict:
    """Why a version fails the gate; ``evidence_missing``: too few figures to judge."""

    reason: str
    evidence_missing: bool = False


def health_gate(
    reports: Sequence[HealthReport], limits: HealthThresholds, *, shadowed: bool
) -> GateVerdict | None:
    """Judge the new version's ``reports``; ``None`` when it passes.

    ``shadowed``: whether shadow samples were asked for, so their absence is missing
    evidence rather than a gate that does not apply.
    """
    missing = _missing_evidence(reports, limits, shadowed=shadowed)
    if missing is not None:
        return GateVerdict(f"no evidence: {missing}", evidence_missing=True)
    for check in (_error_rate, _p99, _agreement, _agreement_drop):
        reason = check(reports, limits)
        if reason is not None:
            return GateVerdict(reason)
    return None


def _missing_evidence(
    reports: Sequence[HealthReport], limits: HealthThresholds, *, shadowed: bool
) -> str | None:
    requests = sum(r.requests for r in reports)
    if requests < limits.min_requests:
        return f"{requests} requests recorded (min_requests {limits.min_requests})"
    if not shadowed:
        return None
    samples = sum(r.shadow_samples for r in reports)
    if samples < limits.min_shadow_samples:
        return (
            f"{samples} shadow samples compared with the cloud teacher "
            f"(min_shadow_samples {limits.min_shadow_samples})"
        )
    if limits.max_agreement_drop is None:
        return None  # an absolute floor needs no baseline
    baseline_samples = sum(
        r.baseline_shadow_samples or 0 for r in reports if r.baseline_shadow_agreement is not None
    )
    if baseline_samples < limits.min_baseline_samples:
        return (
            f"{baseline_samples} baseline shadow samples of the previous version to compare "
            f"the agreement with (min_baseline_samples {limits.min_baseline_samples})"
        )
    return None


def _error_rate(reports: Sequence[HealthReport], limits: HealthThresholds) -> str | None:
    requests = sum(r.requests for r in reports)
    if limits.max_error_rate is None or not requests:
        return None
    rate = sum(r.errors for r in reports) / requests
    with_base = [r for r in reports if r.baseline_error_rate is not None and r.requests]
    base_requests = sum(r.requests for r in with_base)
    if not base_requests:
        if rate > limits.max_error_rate + _EPSILON:
            return (
                f"error rate {rate:.2%} exceeds {limits.max_error_rate:.2%} "
                "(no error rate of the previous version to compare with)"
            )
        return None
    baseline = sum((r.baseline_error_rate or 0.0) * r.requests for r in with_base) / base_requests
    if rate > baseline + limits.max_error_rate + _EPSILON:
        return (
            f"error rate {rate:.2%} exceeds the previous version's {baseline:.2%} "
            f"by more than {limits.max_error_rate:.2%}"
        )
    return None


def _p99(reports: Sequence[HealthReport], limits: HealthThresholds) -> str | None:
    if limits.max_p99_ratio is None:
        return None
    ratios = [
        r.p99_ms / r.baseline_p99_ms
        for r in reports
        if r.p99_ms is not None and r.baseline_p99_ms and r.requests >= P99_MIN_REQUESTS
    ]
    if ratios and (ratio := statistics.median(ratios)) > limits.max_p99_ratio + _EPSILON:
        return f"p99 latency is {ratio:.2f}x the previous version's (limit {limits.max_p99_ratio}x)"
    return None


def _new_agreement(reports: Sequence[HealthReport]) -> float | None:
    """The sample-weighted agreement of the new version, ``None`` without samples."""
    sampled = [r for r in reports if r.shadow_agreement is not None and r.shadow_samples]
    samples = sum(r.shadow_samples for r in sampled)
    if not samples:
        return None
    return sum((r.shadow_agreement or 0.0) * r.shadow_samples for r in sampled) / samples


def _agreement(reports: Sequence[HealthReport], limits: HealthThresholds) -> str | None:
    if limits.min_agreement is None:
        return None
    agreement = _new_agreement(reports)
    if agreement is not None and agreement < limits.min_agreement - _EPSILON:
        return (
            f"shadow agreement with the cloud teacher {agreement:.1%} is under "
            f"{limits.min_agreement:.1%}"
        )
    return None


def _agreement_drop(reports: Sequence[HealthReport], limits: HealthThresholds) -> str | None:
    if limits.max_agreement_drop is None:
        return None
    agreement = _new_agreement(reports)
    based = [
        r for r in reports if r.baseline_shadow_agreement is not None and r.baseline_shadow_samples
    ]
    based_samples = sum(r.baseline_shadow_samples or 0 for r in based)
    if agreement is None or not based_samples:
        return None
    baseline = sum(
        (r.baseline_shadow_agreement or 0.0) * (r.baseline_shadow_samples or 0) for r in based
    )
    baseline /= based_samples
    if baseline - agreement > limits.max_agreement_drop + _EPSILON:
        return (
            f"shadow agreement with the cloud teacher fell to {agreement:.1%} from "
            f"{baseline:.1%} (allowed drop {limits.max_agreement_drop:.1%})"
        )
    return None
