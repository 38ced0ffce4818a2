"""Leadership among rollout controllers: one lease in the fleet database.

Run two or more ``tether fleet serve`` controllers against one PostgreSQL database and
they share the work without sharing decisions: every controller records device reports
(recording is idempotent), but only the holder of the lease ``rollouts`` drives rollouts.
The holder renews the lease on every tick; when it stops renewing (crashed, SIGKILLed,
cut off from the database) the lease expires after ``ttl_s`` and the next controller to
tick takes it over with a higher epoch, so a rollout is handed over within about
``ttl_s + tick_s``. Every decision the leader writes (a wave opened or passed, a rollout
finished or rolled back) is conditional on its term still being current
(:meth:`cloud.fleet_db.FleetDB.set_rollout_state` with ``fence``), so a deposed leader
that wakes up late changes nothing, and no wave advances twice.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from cloud.fleet_db import FleetDB, LeaseTerm

log = logging.getLogger(__name__)

#: The lease the rollout controllers compete for.
LEASE = "rollouts"


def controller_id() -> str:
    """This controller's name in the lease table: host, process and a random part."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Leadership:
    """Asks for (or renews) the rollout lease on each tick and says whether this holds it."""

    def __init__(self, db: FleetDB, *, holder: str | None = None, ttl_s: float = 5.0) -> None:
        self.db = db
        self.holder = holder or controller_id()
        self.ttl_s = ttl_s
        self.term: LeaseTerm | None = None
        #: The highest order sequence number any holder recorded: a new holder's orders
        #: must be numbered above it (devices refuse a lower one as a replay).
        self.seq_floor = 0

    def hold(self, now: float, seq: int = 0) -> LeaseTerm | None:
        """The term this controller holds now (taking the lease if it is free), or ``None``;
        records ``seq``, the highest order number this controller signed so far."""
        held = self.db.take_lease(LEASE, self.holder, now, self.ttl_s, seq=seq)
        term = held[0] if held is not None else None
        if held is not None:
            self.seq_floor = held[1]
        if term != self.term:
            if term is not None:
                log.info("controller %s leads rollouts (term %d)", self.holder, term.epoch)
            elif self.term is not None:
                log.warning("controller %s lost the rollout lease", self.holder)
        self.term = term
        return term

    def release(self) -> None:
        """Hand the lease over at once (a clean stop)."""
        if self.term is not None:
            self.db.release_lease(self.term)
            self.term = None
