"""Per-client token buckets for the local API: a burst at once, a steady rate after.

A client has one bucket for the default rule and one for each endpoint that has a rule of
its own (``http.rate_limit.routes``). An empty bucket answers :class:`TooManyRequests`
whose ``retry_after`` is when the next request would be allowed; the app turns it into
429 with ``Retry-After``. Buckets live in the worker process: with several gunicorn
workers each keeps its own, so a client that spreads over connections may get up to
``workers`` times the rate (docs/security.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from edge.settings import RateLimitSettings
from shared.errors import TooManyRequests

#: The bucket key of endpoints without a rule of their own.
DEFAULT_BUCKET = "*"


@dataclass(frozen=True)
class Rule:
    """``rate`` requests a second on average, ``burst`` at once."""

    rate: float
    burst: int


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by (client, rule), least recently used forgotten past a bound."""

    def __init__(
        self,
        default: Rule,
        routes: Mapping[str, Rule] | None = None,
        *,
        exempt: Iterable[str] = (),
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.routes = dict(routes or {})
        self.exempt = frozenset(exempt)
        self.max_buckets = max_clients * (1 + len(self.routes))
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> RateLimiter:
        return cls(
            Rule(settings.rate, settings.burst),
            {name: Rule(r.rate, r.burst) for name, r in settings.routes.items()},
            exempt=settings.exempt,
            max_clients=settings.max_clients,
        )

    def check(self, client: str, endpoint: str) -> None:
        """Take one request from ``client``'s bucket for ``endpoint``, or raise 429."""
        if endpoint in self.exempt:
            return
        rule = self.routes.get(endpoint)
        key = (client, endpoint if rule is not None else DEFAULT_BUCKET)
        rule = rule or self.default
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(rule.burst), now)
                if len(self._buckets) > self.max_buckets:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                elapsed = max(0.0, now - bucket.updated)
                bucket.tokens = min(float(rule.burst), bucket.tokens + elapsed * rule.rate)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / rule.rate
        raise TooManyRequests(
            f"rate limit of {rule.rate:g} requests/s (burst {rule.burst}) reached; "
            f"retry in {wait:.2f}s",
            retry_after=wait,
        )
