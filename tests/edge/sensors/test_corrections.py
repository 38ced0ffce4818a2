"""What the correction sender does with each answer of the cloud to a stored escalation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.sensors.corrections import CorrectionSender, _Asked
from edge.sensors.outbox import Escalation, Outbox
from shared.errors import InvalidInput, TetherError, TooManyRequests, Unavailable


def escalation(n: int) -> Escalation:
    return Escalation("digits", None, f"t/{n}", b"{}", b"x" * 10, None, f"e{n}")


class _Publisher:
    def wake(self) -> None:
        pass


def sender(outbox: Outbox) -> CorrectionSender:
    return CorrectionSender(None, None, outbox, _Publisher())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "error",
    [TooManyRequests("device over its share", retry_after=1.0), Unavailable("cloud away")],
    ids=["429-admission", "503"],
)
def test_a_busy_or_absent_cloud_keeps_the_escalations_for_later(
    tmp_path: Path, error: TetherError
) -> None:
    """A 429 from the cloud's per-device admission is backpressure, not a verdict: after an
    outage a device's backlog meets it, and dropping those readings would lose them."""
    outbox = Outbox(tmp_path / "o.sqlite3")
    outbox.store([], [escalation(1), escalation(2)])
    group = outbox.peek_escalations(10)
    assert sender(outbox).settle(group, _Asked([], error)) is False
    assert [e.escalation.reading_id for e in outbox.peek_escalations(10)] == ["e1", "e2"]
    assert outbox.stats().dropped == {}


def test_a_request_the_cloud_always_refuses_is_dropped_and_explained(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "o.sqlite3")
    outbox.store([], [escalation(1)])
    group: Any = outbox.peek_escalations(10)
    assert sender(outbox).settle(group, _Asked([], InvalidInput("bad shape"))) is True
    assert outbox.peek_escalations(10) == []
    assert outbox.stats().dropped == {"cloud_rejected:invalid_input": 1}
