"""The arithmetic of staged rollouts: wave sizes, failure budgets and the health gate.

Pure functions, so the controller's decisions can be tested without a broker.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import InvalidInput
from shared.fleet import HealthReport


@dataclass
class RolloutPolicy:
    """A rollout's waves and health gate (see docs/rollouts.md)."""

    waves: list[str]
    window_s: float = 60.0
    max_failure: str = "5%"
    max_error_rate: float | None = 0.02
    max_p99_ratio: float | None = 1.5
    max_agreement_drop: float | None = 0.05
    device_timeout_s: float = 120.0
    shadow_sample_rate: float = 0.1
    #: The target set stays open this long after the start: a device offline until then
    #: gets its wave's order when it comes online (then it is marked ``missed``).
    until_s: float = 86400.0
    #: ``max_failure`` stops the rollout only once this many devices finished installing
    #: (committed or failed), so one early failure among few is not a verdict.
    min_executed: int = 0
    #: At most this many devices ordered per minute, paced evenly (``None``: no limit),
    #: multiplied by ``rate_growth`` after every ``growth_every`` committed devices.
    rate_per_minute: float | None = None
    rate_growth: float = 1.0
    growth_every: int = 0
    #: The health gate judges a wave only on evidence: at least this many requests over
    #: its committed devices' reports, and (when shadow agreement is checked and sampled)
    #: this many shadow samples; fewer fail the wave, never pass it.
    min_requests: int = 1
    min_shadow_samples: int = 1
    #: ... and this many shadow samples of the previous version behind the baseline
    #: agreement (``baseline_shadow_samples``; a report without it counts none).
    min_baseline_samples: int = 1

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RolloutPolicy:
        return cls(**json.loads(text))


def parse_count(text: str, total: int) -> int:
    """``"10%"`` of ``total`` (rounded up) or an absolute ``"3"``."""
    text = text.strip()
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 <= percent <= 100:
                raise ValueError
            return math.ceil(total * percent / 100 - 1e-9)
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise InvalidInput(f"{text!r} is neither a count nor a percentage") from None


def parse_waves(spec: str) -> list[str]:
    """``"1,10%,50%,100%"`` -> ``["1", "10%", "50%", "100%"]`` (validated)."""
    waves = [part.strip() for part in spec.split(",") if part.strip()]
    if not waves:
        raise InvalidInput("--waves needs at least one wave, e.g. 1,10%,100%")
    for wave in waves:
        parse_count(wave, 100)
    return waves


def wave_sizes(waves: Sequence[str], total: int) -> list[int]:
    """Cumulative device counts per wave, each at most ``total``, empty waves dropped."""
    sizes: list[int] = []
    for wave in waves:
        size = min(total, max(parse_count(wave, total), sizes[-1] if sizes else 0))
        if size > (sizes[-1] if sizes else 0):
            sizes.append(size)
    return sizes


def allowed_failures(max_failure: str, ordered: int) -> int:
    """How many failed or silent devices out of ``ordered`` the gate tolerates."""
    if max_failure.strip().endswith("%"):
        return math.floor(ordered * float(max_failure.strip()[:-1]) / 100 + 1e-9)
    return parse_count(max_failure, ordered)


def failure_budget(policy: RolloutPolicy, ordered: int, executed: int) -> int | None:
    """How many failed devices the rollout tolerates now, or ``None`` while too few have
    finished to judge.

    Without ``min_executed``, ``max_failure`` is a share of the devices ordered so far. With
    it (as AWS IoT Jobs' abort criteria), it is a share of the devices that finished
    (committed or failed), applied once at least ``min_executed`` of them have.
    """
    if policy.min_executed > 0:
        if executed < policy.min_executed:
            return None
        return allowed_failures(policy.max_failure, executed)
    return allowed_failures(policy.max_failure, ordered)


def order_allowance(
    policy: RolloutPolicy, first_order_at: float | None, ordered: int, committed: int, now: float
) -> int | None:
    """How many more devices may be ordered now under the rollout rate (``None``: any).

    The rate is ``rate_per_minute``, times ``rate_growth`` for every ``growth_every``
    committed devices (exponential growth on success, as AWS IoT Jobs' rollout rate), and
    orders are paced evenly: since the first order, at most one plus the rate times the
    minutes elapsed.
    """
    if policy.rate_per_minute is None:
        return None
    steps = committed // policy.growth_every if policy.growth_every > 0 else 0
    rate = policy.rate_per_minute * policy.rate_growth**steps
    elapsed_min = 0.0 if first_order_at is None else max(0.0, now - first_order_at) / 60.0
    return max(0, 1 + math.floor(rate * elapsed_min + 1e-9) - ordered)


def health_verdict(reports: Sequence[HealthReport], policy: RolloutPolicy) -> str | None:
    """Why the new version's health fails the gate, or ``None`` when it passes.

    * evidence first: the reports must hold at least ``min_requests`` requests and, when
      the shadow agreement is checked (``max_agreement_drop``) and sampled
      (``shadow_sample_rate`` above 0), ``min_shadow_samples`` shadow samples. Devices
      wait for both within their health window (fleet agent settings of the same names),
      so a wave without them failed to gather any: it fails, it never passes. The same
      holds for the baseline the agreement is compared with: ``min_baseline_samples``
      shadow samples of the previous version (``baseline_shadow_samples`` of the reports
      that carry a ``baseline_shadow_agreement``; a 1.0/1.1 report has no count and
      contributes none). Devices measure it before they switch (fleet agent setting
      ``min_baseline_samples``);
    * error rate: errors / requests over all reports may exceed the previous version's
      (request-weighted ``baseline_error_rate``, 0 when unknown) by ``max_error_rate``;
    * p99: the median over devices of ``p99_ms / baseline_p99_ms`` must stay within
      ``max_p99_ratio`` (devices without both numbers are skipped);
    * shadow agreement: the sample-weighted agreement with the cloud teacher may fall
      below the previous version's by at most ``max_agreement_drop``, the baseline
      weighted by each device's ``baseline_shadow_samples`` (devices without baseline
      samples are left out of the baseline).
    """
    requests = sum(r.requests for r in reports)
    if requests < policy.min_requests:
        return (
            f"no evidence: {requests} requests reported by {len(reports)} committed devices "
            f"(min_requests {policy.min_requests})"
        )
    shadowed = policy.max_agreement_drop is not None and policy.shadow_sample_rate > 0
    samples = sum(r.shadow_samples for r in reports)
    if shadowed and samples < policy.min_shadow_samples:
        return (
            f"no evidence: {samples} shadow samples compared with the cloud teacher "
            f"(min_shadow_samples {policy.min_shadow_samples})"
        )
    baseline_samples = sum(
        r.baseline_shadow_samples or 0 for r in reports if r.baseline_shadow_agreement is not None
    )
    if shadowed and baseline_samples < policy.min_baseline_samples:
        return (
            f"no evidence: {baseline_samples} baseline shadow samples of the previous version "
            f"to compare the agreement with (min_baseline_samples {policy.min_baseline_samples})"
        )
    if policy.max_error_rate is not None and requests:
        errors = sum(r.errors for r in reports)
        rate = errors / requests
        with_base = [r for r in reports if r.baseline_error_rate is not None and r.requests]
        base_requests = sum(r.requests for r in with_base)
        baseline = (
            sum((r.baseline_error_rate or 0.0) * r.requests for r in with_base) / base_requests
            if base_requests
            else 0.0
        )
        if rate > baseline + policy.max_error_rate + 1e-12:
            return (
                f"error rate {rate:.2%} exceeds the previous version's {baseline:.2%} "
                f"by more than {policy.max_error_rate:.2%}"
            )
    if policy.max_p99_ratio is not None:
        ratios = [
            r.p99_ms / r.baseline_p99_ms
            for r in reports
            if r.p99_ms is not None and r.baseline_p99_ms
        ]
        if ratios and (ratio := statistics.median(ratios)) > policy.max_p99_ratio:
            return f"p99 latency is {ratio:.2f}x the previous version's (limit {policy.max_p99_ratio}x)"
    if policy.max_agreement_drop is not None:
        sampled = [r for r in reports if r.shadow_agreement is not None and r.shadow_samples]
        samples = sum(r.shadow_samples for r in sampled)
        based = [
            r
            for r in reports
            if r.baseline_shadow_agreement is not None and r.baseline_shadow_samples
        ]
        based_samples = sum(r.baseline_shadow_samples or 0 for r in based)
        if samples and based_samples:
            agreement = sum((r.shadow_agreement or 0.0) * r.shadow_samples for r in sampled)
            agreement /= samples
            baseline = sum(
                (r.baseline_shadow_agreement or 0.0) * (r.baseline_shadow_samples or 0)
                for r in based
            )
            baseline /= based_samples
            if baseline - agreement > policy.max_agreement_drop + 1e-12:
                return (
                    f"shadow agreement with the cloud teacher fell to {agreement:.1%} from "
                    f"{baseline:.1%} (allowed drop {policy.max_agreement_drop:.1%})"
                )
    return None
