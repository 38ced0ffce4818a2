"""The arithmetic of staged rollouts: wave sizes, failure budgets, and the policy's view
of the health gate.

Pure functions, so the controller's decisions can be tested without a broker.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from shared.errors import InvalidInput
from shared.fleet import HealthReport
from shared.health_gate import HealthThresholds, health_gate


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

    The reports of a wave's committed devices go through the one health gate the devices
    use too (:func:`shared.health_gate.health_gate`; docs/rollouts.md): the policy's
    ``max_error_rate`` is how far the error rate may exceed the previous version's,
    ``max_p99_ratio`` the highest median ``p99_ms / baseline_p99_ms`` and
    ``max_agreement_drop`` how far the shadow agreement may fall below the previous
    version's. Evidence first: fewer than ``min_requests`` requests, or, when the agreement
    is checked and sampled (``shadow_sample_rate`` above 0), fewer than
    ``min_shadow_samples`` shadow samples or ``min_baseline_samples`` behind the baseline
    (a 1.0/1.1 report has no count and contributes none), fail the wave: devices wait for
    them within their health window, so a wave without them failed to gather any.
    """
    limits = HealthThresholds(
        max_error_rate=policy.max_error_rate,
        max_p99_ratio=policy.max_p99_ratio,
        max_agreement_drop=policy.max_agreement_drop,
        min_requests=policy.min_requests,
        min_shadow_samples=policy.min_shadow_samples,
        min_baseline_samples=policy.min_baseline_samples,
    )
    shadowed = policy.max_agreement_drop is not None and policy.shadow_sample_rate > 0
    verdict = health_gate(reports, limits, shadowed=shadowed)
    return verdict.reason if verdict is not None else None
