"""The circuit breaker's states, with a fake clock."""

from __future__ import annotations

import pytest

from edge.breaker import BreakerOpen, BreakerState, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(threshold: int = 3, cooldown: float = 2.0) -> tuple[CircuitBreaker, Clock]:
    clock = Clock()
    return CircuitBreaker(failure_threshold=threshold, cooldown_s=cooldown, clock=clock), clock


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.failure()


def test_opens_after_consecutive_failures_only() -> None:
    breaker, _ = make()
    fail(breaker, 2)
    breaker.acquire()
    breaker.success()  # a success resets the count
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(BreakerOpen) as info:
        breaker.acquire()
    assert info.value.status == 503 and info.value.retry_after == pytest.approx(2.0)


def test_half_open_lets_one_trial_through_and_closes_on_success() -> None:
    breaker, clock = make()
    fail(breaker, 3)
    clock.now += 2.0
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.acquire()
    with pytest.raises(BreakerOpen):
        breaker.acquire()  # only one trial at a time
    breaker.success()
    assert breaker.state is BreakerState.CLOSED
    breaker.acquire()


def test_failed_trial_opens_again_for_a_full_cooldown() -> None:
    breaker, clock = make()
    fail(breaker, 3)
    clock.now += 2.5
    breaker.acquire()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN
    clock.now += 1.9
    with pytest.raises(BreakerOpen):
        breaker.acquire()
    clock.now += 0.2
    breaker.acquire()


def test_released_trial_frees_the_slot_and_reset_closes() -> None:
    breaker, clock = make(threshold=1)
    fail(breaker, 1)
    clock.now += 2.0
    breaker.acquire()
    breaker.release()  # neutral outcome: say nothing about health
    breaker.acquire()
    breaker.release()
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED


def test_listeners_hear_state_changes() -> None:
    breaker, clock = make(threshold=1)
    heard: list[BreakerState] = []
    breaker.add_listener(heard.append)
    fail(breaker, 1)
    clock.now += 2.0
    breaker.acquire()
    breaker.success()
    assert heard == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
