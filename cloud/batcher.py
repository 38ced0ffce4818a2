"""Per-model request queues and Triton's dynamic batcher, feeding a pool of worker threads.

MQTT handlers only :meth:`DynamicBatcher.put` a request (and get :class:`Overloaded` when
the bounded queue is full); worker threads :meth:`~DynamicBatcher.take` batches. Models
are served in arrival order (the model whose oldest request is oldest goes first). A
batch holds the oldest request of a model and every queued request that is compatible
with it (same batch key: same runtime, input names, datatypes and shapes past dim 0, same
outputs), up to ``max_batch_size`` rows; when it is not full, it waits for more until the
oldest request has waited ``max_queue_delay_ms``. With ``max_batch_size = 0`` (the
default, as in Triton) every request runs on its own.

Deadlines are checked when a request is taken: a request past its deadline is handed
back in :attr:`Batch.expired`, never run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from cloud.settings import BatchPolicy
from shared.errors import Unavailable

T = TypeVar("T")


class Overloaded(Unavailable):
    """The worker's request queue is full; another worker (or a retry) should take it."""

    reason = "overloaded"


class Draining(Unavailable):
    """The worker is shutting down and takes no new work."""

    reason = "draining"


@dataclass
class Queued(Generic[T]):
    """One request waiting in a model's queue."""

    item: T
    model: str
    #: Requests with equal keys can be concatenated along dim 0; ``None`` runs alone.
    key: Hashable | None
    rows: int
    arrived: float
    #: ``time.monotonic()`` after which nobody waits for the answer.
    deadline: float | None = None

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class Batch(Generic[T]):
    """What a worker thread got: requests to run together, and requests to drop."""

    jobs: list[Queued[T]] = field(default_factory=list)
    expired: list[Queued[T]] = field(default_factory=list)
    #: ``time.monotonic()`` when the batch was formed (the end of its queue time).
    formed: float = 0.0

    @property
    def rows(self) -> int:
        return sum(job.rows for job in self.jobs)


class DynamicBatcher(Generic[T]):
    """Bounded per-model FIFO queues from which worker threads take batches."""

    def __init__(
        self,
        policy: Callable[[str], BatchPolicy],
        limit: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self.limit = limit
        self._clock = clock
        self._queues: dict[str, deque[Queued[T]]] = {}
        self._forming: set[str] = set()
        self._pending = 0
        self._closed = False
        self._cond = threading.Condition()

    def __len__(self) -> int:
        """Requests waiting (not yet taken by a worker thread)."""
        return self._pending

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, job: Queued[T]) -> None:
        """Queue a request; :class:`Overloaded` when full, :class:`Draining` once closed."""
        with self._cond:
            if self._closed:
                raise Draining("this cloud worker is shutting down; send the request again")
            if self._pending >= self.limit:
                raise Overloaded(
                    f"this cloud worker has {self._pending} requests queued (its limit)"
                )
            self._queues.setdefault(job.model, deque()).append(job)
            self._pending += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Take no more requests; those queued are still handed out, without batch delay."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def discard(self) -> list[Queued[T]]:
        """Close and empty every queue; returns the requests that will now never run."""
        with self._cond:
            self._closed = True
            dropped = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            self._pending = 0
            self._cond.notify_all()
        return dropped

    def take(self) -> Batch[T] | None:
        """Block until there is a batch (or expired requests); ``None`` once closed and empty."""
        with self._cond:
            while True:
                expired: list[Queued[T]] = []
                model = self._oldest_model(expired)
                if expired:
                    self._cond.notify_all()
                    return Batch(expired=expired, formed=self._clock())
                if model is not None:
                    return self._form(model)
                if self._closed and self._pending == 0:
                    return None
                self._cond.wait()

    # ------------------------------------------------------------------ internals

    def _oldest_model(self, expired: list[Queued[T]]) -> str | None:
        """The free model whose head request is oldest; expired heads go to ``expired``."""
        now = self._clock()
        best: str | None = None
        best_arrived = 0.0
        for model, queue in self._queues.items():
            while queue and queue[0].expired(now):
                expired.append(queue.popleft())
                self._pending -= 1
            if not queue or model in self._forming:
                continue
            if best is None or queue[0].arrived < best_arrived:
                best, best_arrived = model, queue[0].arrived
        return best

    def _form(self, model: str) -> Batch[T]:
        """Pop ``model``'s head and gather compatible requests (called holding the lock)."""
        queue = self._queues[model]
        head = queue.popleft()
        self._pending -= 1
        batch = Batch(jobs=[head])
        policy = self._policy(model)
        limit = policy.max_batch_size
        if limit > 0 and head.key is not None and head.rows < limit:
            self._forming.add(model)
            try:
                self._gather(queue, head, batch, limit, policy.max_queue_delay_ms / 1000.0)
            finally:
                self._forming.discard(model)
                self._cond.notify_all()
        now = self._clock()
        batch.formed = now
        live = [job for job in batch.jobs if not job.expired(now)]
        if len(live) != len(batch.jobs):
            batch.expired.extend(job for job in batch.jobs if job.expired(now))
            batch.jobs = live
        return batch

    def _gather(
        self, queue: deque[Queued[T]], head: Queued[T], batch: Batch[T], limit: int, delay: float
    ) -> None:
        rows = head.rows
        until = head.arrived + delay
        while True:
            now = self._clock()
            for job in list(queue):
                if job.expired(now):
                    queue.remove(job)
                    self._pending -= 1
                    batch.expired.append(job)
                elif job.key == head.key and rows + job.rows <= limit:
                    queue.remove(job)
                    self._pending -= 1
                    batch.jobs.append(job)
                    rows += job.rows
            if rows >= limit or self._closed or now >= until:
                return
            self._cond.wait(until - now)
