"""The failure budget, with and without a minimum number of executed devices."""

from __future__ import annotations

from cloud.fleet_db import RolloutPolicy
from cloud.rollout_policy import failure_budget, order_allowance


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
