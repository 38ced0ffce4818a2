"""A circuit breaker for the cloud uplink: a dead cloud costs a fast failure, not a timeout.

Closed (normal) -> open after ``failure_threshold`` consecutive failures; while open every
call is refused at once with :class:`~shared.errors.Unavailable`; after ``cooldown_s`` the
breaker is half-open and lets ``half_open_calls`` trial calls through: a success closes
it, a failure opens it again for another cool-down.

Callers take a slot with :meth:`CircuitBreaker.acquire` and report the outcome with
:meth:`success`, :meth:`failure` or :meth:`release` (an outcome that says nothing about the
cloud's health, such as the caller's own bad input or a broker that is down, which already
fails fast).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable

from shared.errors import Unavailable


class BreakerState(str, enum.Enum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerOpen(Unavailable):
    """The breaker refused a call because the remote side failed repeatedly."""

    reason = "circuit_open"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


StateListener = Callable[[BreakerState], None]


class CircuitBreaker:
    """Closed / open / half-open breaker; thread-safe."""

    def __init__(
        self,
        name: str = "cloud",
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 2.0,
        half_open_calls: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or half_open_calls < 1 or cooldown_s < 0:
            raise ValueError("breaker needs failure_threshold >= 1, half_open_calls >= 1")
        self.name = name
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.half_open_calls = half_open_calls
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trials = 0
        self._listeners: list[StateListener] = []

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker past its cool-down reads as half-open)."""
        with self._lock:
            if self._state is BreakerState.OPEN and self._cooled_down():
                return BreakerState.HALF_OPEN
            return self._state

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(state)`` whenever the breaker changes state."""
        self._listeners.append(listener)

    def acquire(self) -> None:
        """Take a slot for one call, or raise :class:`BreakerOpen` at once."""
        with self._lock:
            if self._state is BreakerState.OPEN:
                if not self._cooled_down():
                    left = self.cooldown_s - (self._clock() - self._opened_at)
                    raise BreakerOpen(
                        f"{self.name} is failing ({self._failures} failures in a row); "
                        f"not trying again for {left:.1f}s",
                        retry_after=max(left, 0.0),
                    )
                changed = self._move(BreakerState.HALF_OPEN)
                self._trials = 0
            else:
                changed = None
            if self._state is BreakerState.HALF_OPEN:
                if self._trials >= self.half_open_calls:
                    raise BreakerOpen(
                        f"{self.name} is being probed after failures; try again shortly",
                        retry_after=self.cooldown_s,
                    )
                self._trials += 1
        self._notify(changed)

    def success(self) -> None:
        """The call worked: reset the failure count and close the breaker."""
        with self._lock:
            self._failures = 0
            self._trials = max(0, self._trials - 1)
            changed = self._move(BreakerState.CLOSED)
        self._notify(changed)

    def failure(self) -> None:
        """The call failed because of the remote side: count it; maybe open the breaker."""
        with self._lock:
            self._failures += 1
            self._trials = max(0, self._trials - 1)
            changed = None
            if self._state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
                self._opened_at = self._clock()
                changed = self._move(BreakerState.OPEN)
        self._notify(changed)

    def release(self) -> None:
        """The call ended with an outcome that says nothing about the remote side."""
        with self._lock:
            self._trials = max(0, self._trials - 1)

    def reset(self) -> None:
        """Close the breaker and forget past failures (e.g. on a fresh connection)."""
        with self._lock:
            self._failures = 0
            self._trials = 0
            changed = self._move(BreakerState.CLOSED)
        self._notify(changed)

    # ------------------------------------------------------------------ internals

    def _cooled_down(self) -> bool:
        return self._clock() - self._opened_at >= self.cooldown_s

    def _move(self, state: BreakerState) -> BreakerState | None:
        if self._state is state:
            return None
        self._state = state
        return state

    def _notify(self, changed: BreakerState | None) -> None:
        if changed is None:
            return
        for listener in list(self._listeners):
            listener(changed)
