"""The rollout lease: one holder at a time, handed over on expiry, a deposed holder fenced."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.leadership import Leadership
from cloud.rollout_policy import RolloutPolicy
from harness.fleet import BACKENDS, open_db


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_leader_handover_on_expiry_and_a_fenced_deposed_leader(
    backend: str, tmp_path: Path
) -> None:
    db = open_db(backend, tmp_path)
    try:
        a = Leadership(db, holder="a", ttl_s=5.0)
        b = Leadership(db, holder="b", ttl_s=5.0)
        first = a.hold(100.0)
        assert first is not None and first.epoch == 1
        assert b.hold(101.0) is None
        assert a.hold(104.0) == first  # renewed until 109
        assert b.hold(108.0) is None
        db.create_rollout("r1", "m", 2, {}, RolloutPolicy(waves=["100%"]), [("d1", 0, 1)], 0.0)

        second = b.hold(109.5)  # a stopped renewing: b takes over with a new epoch
        assert second is not None and second.epoch == 2
        assert a.hold(109.6) is None
        # a, deposed but unaware, tries to advance the wave: fenced out; b's decision lands
        assert not db.set_rollout_state("r1", "running", 110.0, wave=1, expect_wave=0, fence=first)
        assert db.set_rollout_state("r1", "running", 110.0, wave=1, expect_wave=0, fence=second)
        # the same wave cannot advance twice, even by the leader
        assert not db.set_rollout_state("r1", "running", 110.1, wave=1, expect_wave=0, fence=second)
        assert db.rollout("r1").wave == 1

        b.release()  # a clean stop hands over at once
        third = a.hold(110.2)
        assert third is not None and third.epoch == 3 and third.holder == "a"
    finally:
        db.drop_schema()
        db.close()
