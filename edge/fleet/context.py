"""What the parts of a fleet agent share: the device's settings and state, the serving
target, the clock, and the events and status it reports."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from edge.fleet.kept_artifacts import Fetched
from edge.fleet.state import FleetState, ModelPhase, ModelState, StateStore
from edge.fleet.status_reporter import StatusReporter
from edge.fleet.target import ServingTarget
from edge.settings import EdgeSettings
from shared import topics
from shared.fleet import HealthReport, RolloutEvent

log = logging.getLogger(__name__)

#: Called at named points of an install (tests use it to SIGKILL at a chosen moment).
StepHook = Callable[[str, str, int], None]


class FleetContext:
    """One device's fleet settings, remembered state (saved before each step takes
    effect), serving target, clock and reporter, shared by the agent's parts."""

    def __init__(
        self,
        settings: EdgeSettings,
        target: ServingTarget,
        *,
        step_hook: StepHook | None,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.fleet = settings.fleet
        self.device = topics.check_segment(settings.device_id, "device id")
        self.root = settings.repository
        self.target = target
        self.step_hook = step_hook
        self.clock = clock
        self.store = StateStore(settings.data_dir / "fleet" / "state.json")
        self.state: FleetState = self.store.load()
        self.reporter = StatusReporter(
            self.device, hardware=self.fleet.hardware, labels=self.fleet.labels
        )
        #: When the retained status is next refreshed (0: at the next tick).
        self.next_status = 0.0

    def save(self) -> None:
        self.store.save(self.state)

    def phase(self, st: ModelState, phase: ModelPhase) -> None:
        st.phase = phase
        self.save()

    def hook(self, step: str, name: str, version: int) -> None:
        if self.step_hook is not None:
            self.step_hook(step, name, version)

    def status_soon(self) -> None:
        """Refresh the retained status at the next tick (a model's phase changed)."""
        self.next_status = 0.0

    def event(
        self,
        rid: str,
        name: str,
        version: int,
        step: Any,
        reason: str = "",
        health: HealthReport | None = None,
        fetched: Fetched | None = None,
    ) -> None:
        """Report one step of a rollout on ``tether/<device>/rollout/events``."""
        event = RolloutEvent(
            rollout_id=rid or "none",
            device=self.device,
            model=name,
            version=version,
            step=step,
            reason=reason,
            health=health,
            at=self.clock(),
            bytes_downloaded=fetched.bytes if fetched is not None else None,
            delta_from=fetched.delta_from if fetched is not None else None,
        )
        log.info("%s: %s v%s %s %s", self.device, name, version, step, reason)
        self.reporter.publish_event(event)


def finish(st: ModelState, key: str, rid: str, version: int, step: str, reason: str) -> None:
    """Mark an order finished and remember its final event (saved with the state change)."""
    st.remember(key)
    st.last_final = {"rollout_id": rid, "version": version, "step": step, "reason": reason}
