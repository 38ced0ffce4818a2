"""The health window of a freshly switched version: collect its figures, judge them with
the shared health gate, report them.

The window opens at the switch with the new version's counters and the previous version's
(its baseline); at its end the difference is a :class:`~shared.fleet.HealthReport`, judged
by :func:`shared.health_gate.health_gate`, the gate the controller applies to a wave. A
window without the evidence the gate needs is held up to ``fleet.evidence_timeout_s``
longer, then fails. Windows live in memory: a restart opens a new one.
"""

from __future__ import annotations

from dataclasses import dataclass

from edge.fleet.context import FleetContext
from edge.fleet.state import ModelState
from edge.health import HealthCounters, HealthSource
from edge.shadow import ShadowRates
from shared.fleet import HealthReport
from shared.health_gate import HealthThresholds, health_gate


@dataclass
class _Window:
    start: HealthCounters
    baseline: HealthCounters | None


@dataclass(frozen=True)
class Judgement:
    """The end of a window: its report, and why the version failed (``None``: healthy)."""

    report: HealthReport
    failure: str | None


class HealthWindow:
    """The open health windows of one device's models."""

    def __init__(
        self, ctx: FleetContext, health: HealthSource | None, shadow_rates: ShadowRates | None
    ) -> None:
        self.ctx = ctx
        self.health = health
        self.shadow_rates = shadow_rates
        self._windows: dict[str, _Window] = {}

    def counters(self, name: str, version: int) -> HealthCounters:
        """The cumulative figures of one version (empty without a health source)."""
        if self.health is None:
            return HealthCounters()
        return self.health.counters(name, str(version))

    def open(self, name: str, start: HealthCounters, baseline: HealthCounters | None) -> None:
        """Start judging ``name`` from ``start`` on, against the previous version's figures."""
        self._windows[name] = _Window(start, baseline)

    def close(self, name: str) -> None:
        self._windows.pop(name, None)

    def length_s(self, st: ModelState) -> float:
        """The window: the device's setting, else the order's, else 60 s."""
        if self.ctx.fleet.health_window_s is not None:
            return self.ctx.fleet.health_window_s
        return st.health_window_s if st.health_window_s is not None else 60.0

    def ends_at(self, st: ModelState) -> float | None:
        """When the window of a switched version ends (``None``: no window open)."""
        if st.phase != "active" or st.activated_at is None or st.active is None:
            return None
        return st.activated_at + self.length_s(st)

    def report(self, name: str, version: int) -> HealthReport:
        """The figures of ``version`` since its window opened, beside its baseline's."""
        window = self._windows.get(name)
        now = self.counters(name, version)
        seen = now.minus(window.start) if window is not None else now
        baseline = window.baseline if window is not None else None
        return HealthReport(
            requests=seen.requests,
            errors=seen.errors,
            p99_ms=seen.p99_ms(),
            shadow_samples=seen.shadow_samples,
            shadow_agreement=seen.agreement(),
            baseline_p99_ms=baseline.p99_ms() if baseline is not None else None,
            baseline_error_rate=baseline.error_rate() if baseline is not None else None,
            baseline_shadow_agreement=baseline.agreement() if baseline is not None else None,
            baseline_shadow_samples=baseline.shadow_samples if baseline is not None else None,
        )

    def judge(self, name: str, st: ModelState) -> Judgement | None:
        """Judge a version whose window ended; ``None`` while it waits for evidence.

        A version is never healthy for want of figures: it needs ``min_requests`` answered
        requests, ``min_shadow_samples`` compared rows when its order asked for shadow
        sampling (and this device shadows: it was given shadow rates), and figures that
        could be read (``/metrics`` scraped)."""
        assert st.active is not None and st.activated_at is not None
        fleet = self.ctx.fleet
        report = self.report(name, st.active)
        rate = self.shadow_rates.get(name, str(st.active)) if self.shadow_rates else 0.0
        shadowed = rate > 0 and fleet.min_shadow_samples > 0
        limits = HealthThresholds(
            max_error_rate=fleet.max_error_rate,
            max_p99_ratio=fleet.max_p99_ratio,
            min_agreement=fleet.min_shadow_agreement,
            min_requests=fleet.min_requests,
            min_shadow_samples=fleet.min_shadow_samples,
        )
        missing: str | None = None
        unreadable = getattr(self.health, "last_error", "")
        if (shadowed or fleet.min_requests > 0) and unreadable:
            missing = f"no evidence: health figures unavailable ({unreadable})"
        verdict = health_gate([report], limits, shadowed=shadowed)
        if missing is None and verdict is not None and verdict.evidence_missing:
            missing = verdict.reason
        if missing is not None:
            if self.ctx.clock() < self.ends_at_with_evidence(st):
                return None  # hold the window until the evidence arrives
            timeout = fleet.evidence_timeout_s
            return Judgement(report, f"unhealthy: {missing} within {timeout:g}s")
        return Judgement(report, f"unhealthy: {verdict.reason}" if verdict is not None else None)

    def ends_at_with_evidence(self, st: ModelState) -> float:
        """How long a window without evidence is held: its end plus the evidence timeout."""
        assert st.activated_at is not None
        return st.activated_at + self.length_s(st) + self.ctx.fleet.evidence_timeout_s

    def reports(self) -> dict[str, HealthReport]:
        """The current figures of every model in its window (for the retained status)."""
        return {
            name: self.report(name, st.active)
            for name, st in self.ctx.state.models.items()
            if st.phase == "active" and st.active is not None
        }
