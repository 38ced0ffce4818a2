"""Order intake: which rollout orders a device acts on, and what each one asks of it.

An order is acted on only when the fleet key signed it for this device, it has not
expired, and it is newer than the last order accepted (:mod:`shared.order_signing`);
anything else is refused with a ``refused`` event (rollout id ``unverified-order``) and a
log line, before it can touch a file or cancel anything. An order already carried out is
not carried out again (the retained order comes back after every reconnect); a rollback or
abort of a model this device does not manage changes nothing; an abort remembers its
rollout, so a resent install of it never starts a download.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.fleet.context import FleetContext, finish
from edge.fleet.install import InstallPipeline
from edge.fleet.state import ModelState
from edge.fleet.versions import VersionSwitch
from serving.model_config import list_models
from shared.fleet import RolloutOrder
from shared.mqtt import Message
from shared.order_signing import OrderRefused, VerifiedOrder, replay_reason, verify_order

log = logging.getLogger(__name__)

#: The rollout id of the ``refused`` event for an order that failed verification: its own
#: rollout id is not trusted, and a refusal must not count against a real rollout.
UNVERIFIED_ORDER = "unverified-order"
#: At most this many refusal events per ``REFUSAL_WINDOW_S`` (each is logged regardless).
REFUSAL_EVENTS = 10
REFUSAL_WINDOW_S = 10.0


class OrderIntake:
    """Verifies orders as they arrive and dispatches them on the work thread."""

    def __init__(
        self,
        ctx: FleetContext,
        *,
        install: InstallPipeline,
        switch: VersionSwitch,
        trusted_keys: list[Ed25519PublicKey],
        queue_work: Callable[[str, VerifiedOrder | OrderRefused], None],
    ) -> None:
        self.ctx = ctx
        self.install = install
        self.switch = switch
        self.trusted_keys = trusted_keys
        self.queue_work = queue_work
        self._refusals: deque[float] = deque()
        self._reported_again: set[str] = set()

    def on_order(self, message: Message) -> None:
        """Verify an order (MQTT thread) and queue it, or queue its refusal."""
        if not message.payload:
            return  # a cleared retained order
        ctx = self.ctx
        try:
            verified = verify_order(
                message.payload,
                self.trusted_keys,
                device=ctx.device,
                now=ctx.clock(),
                accepted_digest=ctx.state.order_digest,
            )
            self._check_replay(verified)
        except OrderRefused as exc:
            self.queue_work("refused", exc)
            return
        self.install.interrupt(verified.order)
        self.queue_work("order", verified)

    def _check_replay(self, verified: VerifiedOrder) -> None:
        state = self.ctx.state
        why = replay_reason(verified, state.order_seq, state.order_digest)
        if why is not None:
            order = verified.order
            claimed = f"action {order.action}, rollout_id {order.rollout_id}, model {order.model}"
            raise OrderRefused(why, claimed)

    def accept(self, verified: VerifiedOrder) -> None:
        """Record a verified order as the last accepted (so an older one is a replay from
        now on), then carry it out."""
        try:
            self._check_replay(verified)  # again: another order may have come first
        except OrderRefused as exc:
            self.refuse(exc)
            return
        state = self.ctx.state
        if (state.order_seq, state.order_digest) != (verified.order.seq, verified.digest):
            state.order_seq, state.order_digest = verified.order.seq, verified.digest
            self.ctx.save()
        self.handle(verified.order)

    def refuse(self, refused: OrderRefused) -> None:
        """Log a refused order and report it (at most ``REFUSAL_EVENTS`` per window)."""
        reason = f"order refused: {refused.message}"
        if refused.claimed:
            reason += f" (it claims {refused.claimed})"
        log.warning("%s: %s", self.ctx.device, reason)
        now = time.monotonic()
        while self._refusals and now - self._refusals[0] > REFUSAL_WINDOW_S:
            self._refusals.popleft()
        if len(self._refusals) >= REFUSAL_EVENTS:
            return
        self._refusals.append(now)
        self.ctx.event(UNVERIFIED_ORDER, "unknown", 0, "refused", reason)

    def handle(self, order: RolloutOrder) -> None:
        """Carry out one verified order (idempotent: a finished order is ignored)."""
        ctx = self.ctx
        if order.action != "install" and not self._manages(order.model):
            # Nothing of this model is on the device or in the agent's records: there is
            # nothing to undo, and no folder or record is made for a name it never had.
            reason = f"{order.action} of {order.model}: not managed here, nothing to undo"
            ctx.event(order.rollout_id, order.model, 0, "rolled_back", reason)
            return
        st = ctx.state.model(order.model)
        if f"{order.rollout_id}:{order.action}" in st.handled:
            self._report_again(order.model, st)
            return
        if order.action == "install":
            self.install.install(order, st)
        elif order.action == "rollback":
            version = st.active or 0
            self.switch.roll_back(
                order.model, order.rollout_id, order.rollback_to, "rollback ordered", "rollback"
            )
            log.info("%s: rolled %s back from %s", ctx.device, order.model, version)
        else:
            self._abort(order, st)

    def _manages(self, name: str) -> bool:
        """Whether ``name`` is a model of this device: in the agent's records or a model
        folder with versions in the repository."""
        if name in self.ctx.state.models:
            return True
        return name in list_models(self.ctx.root)

    def _report_again(self, name: str, st: ModelState) -> None:
        """Repeat the last final event once per run: the previous run may have died first."""
        final = st.last_final
        if final is None or name in self._reported_again:
            return
        self._reported_again.add(name)
        self.ctx.event(
            str(final["rollout_id"]),
            name,
            int(final["version"]),
            final["step"],
            str(final["reason"]),
        )

    def _abort(self, order: RolloutOrder, st: ModelState) -> None:
        if st.rollout_id == order.rollout_id and st.phase in ("active", "committed"):
            self.switch.roll_back(
                order.model, order.rollout_id, order.rollback_to, "aborted", "abort"
            )
            return
        version = st.pending or 0
        finish(st, f"{order.rollout_id}:abort", order.rollout_id, version, "rolled_back", "aborted")
        # An install order of the aborted rollout that arrives after this one (a resend
        # that crossed the abort) is stale: it must never start a download.
        st.remember(f"{order.rollout_id}:install")
        self.ctx.save()
        self.ctx.event(order.rollout_id, order.model, version, "rolled_back", "aborted")
