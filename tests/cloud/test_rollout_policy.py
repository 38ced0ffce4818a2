"""The failure budget, with and without a minimum number of executed devices."""

from __future__ import annotations

from cloud.fleet_db import RolloutPolicy
from cloud.rollout_policy import failure_budget


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
