"""Per-version health figures: what the fleet agent judges a new version by.

:class:`HealthRecorder` is a data-plane observer: it counts requests, server-side errors
and latency per ``(model, version)``, and the shadow samples the
:class:`~edge.shadow.ShadowSampler` compared with the cloud teacher. The counters only
grow; the fleet agent takes a :class:`HealthCounters` snapshot when it switches versions
and judges the difference at the end of the health window.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import Protocol

from serving.dataplane import Observation

#: Latency bucket bounds in milliseconds (p99 is read as the bound its rank falls under).
LATENCY_BOUNDS_MS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500,
    5000, 10000,
)  # fmt: skip


@dataclass(frozen=True)
class HealthCounters:
    """Cumulative counts for one model version (or a difference of two snapshots)."""

    requests: int = 0
    errors: int = 0
    #: Requests per latency bucket (last bucket: over the highest bound).
    buckets: tuple[int, ...] = field(default=(0,) * (len(LATENCY_BOUNDS_MS) + 1))
    shadow_samples: int = 0
    shadow_agreements: int = 0

    def minus(self, earlier: HealthCounters) -> HealthCounters:
        """What happened between ``earlier`` and this snapshot."""
        return HealthCounters(
            self.requests - earlier.requests,
            self.errors - earlier.errors,
            tuple(a - b for a, b in zip(self.buckets, earlier.buckets, strict=True)),
            self.shadow_samples - earlier.shadow_samples,
            self.shadow_agreements - earlier.shadow_agreements,
        )

    @property
    def answered(self) -> int:
        return sum(self.buckets)

    def p99_ms(self) -> float | None:
        """The 99th percentile latency (a bucket bound), or ``None`` without requests."""
        total = self.answered
        if total == 0:
            return None
        rank = 0.99 * total
        running = 0
        for index, count in enumerate(self.buckets):
            running += count
            if running >= rank:
                if index < len(LATENCY_BOUNDS_MS):
                    return float(LATENCY_BOUNDS_MS[index])
                return float(LATENCY_BOUNDS_MS[-1]) * 2
        return float(LATENCY_BOUNDS_MS[-1]) * 2

    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def agreement(self) -> float | None:
        return self.shadow_agreements / self.shadow_samples if self.shadow_samples else None


class HealthSource(Protocol):
    """Where the fleet agent reads a version's cumulative health counters."""

    def counters(self, model: str, version: str) -> HealthCounters: ...


class _Tally:
    __slots__ = ("buckets", "errors", "requests", "shadow_agreements", "shadow_samples")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.shadow_samples = 0
        self.shadow_agreements = 0


class HealthRecorder:
    """Counts requests, errors, latency and shadow agreement per model version."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[tuple[str, str], _Tally] = {}

    def _tally(self, model: str, version: str) -> _Tally:
        key = (model, version)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally()
        return tally

    def __call__(self, seen: Observation) -> None:
        """The data-plane observer: count one finished inference."""
        if seen.version is None or seen.served_by != "edge":
            return  # a cloud-only answer says nothing about the device's version
        if seen.error is not None and seen.error.status < 500:
            return  # the caller's mistake says nothing about the version
        with self._lock:
            tally = self._tally(seen.model, seen.version)
            tally.requests += 1
            if seen.error is not None:
                tally.errors += 1
            else:
                index = bisect.bisect_left(LATENCY_BOUNDS_MS, seen.seconds * 1000.0)
                tally.buckets[index] += 1

    def record_shadow(self, model: str, version: str, samples: int, agreements: int) -> None:
        """Add compared rows of shadow traffic (called by the shadow sampler)."""
        with self._lock:
            tally = self._tally(model, version)
            tally.shadow_samples += samples
            tally.shadow_agreements += agreements

    def counters(self, model: str, version: str) -> HealthCounters:
        with self._lock:
            tally = self._tallies.get((model, version))
            if tally is None:
                return HealthCounters()
            return HealthCounters(
                tally.requests,
                tally.errors,
                tuple(tally.buckets),
                tally.shadow_samples,
                tally.shadow_agreements,
            )
