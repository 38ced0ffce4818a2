"""A lane: one model's readings, inferred several micro-batches at once, answered in order.

Each lane runs ``batches_in_flight`` worker threads. A worker takes the lane's next
micro-batch from the intake (batches are numbered as they are taken), asks the data
plane for answers, and then waits for its batch's turn to commit: the answers go into
the outbox, and the readings out of the intake, in the order the batches were taken. So
while one batch waits for its cloud escalation, the next ones are inferred and escalated
(at most ``batches_in_flight`` escalations in flight), and results still leave in the
order the readings arrived, per sensor and across the lane.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from edge.sensors.bindings import Binding
from edge.sensors.intake import Intake, StoredReading, reading_id_of
from edge.sensors.processor import Answer, BatchProcessor
from edge.sensors.results import Reading

log = logging.getLogger(__name__)

Answered = tuple[Sequence[StoredReading], Answer]
#: Stores answered batches (in the order given) in one transaction.
Commit = Callable[[Sequence[Answered]], None]

#: Wait after a failed commit (the disk is full or broken) before trying again.
RETRY_S = 1.0


class Lane:
    """The readings of one model (and version), from the intake to the outbox."""

    def __init__(
        self,
        key: str,
        model: str,
        binding_for: Callable[[str], Binding | None],
        intake: Intake,
        processor: BatchProcessor,
        commit: Commit,
        *,
        max_messages: int,
        max_delay_ms: float,
    ) -> None:
        self.key = key
        self.model = model
        self.binding_for = binding_for
        self.intake = intake
        self.processor = processor
        self.commit = commit
        self.max_messages = max_messages
        self.max_delay_s = max_delay_ms / 1000.0
        self._take = threading.Lock()
        self._turn = threading.Condition()
        self._taken = 0
        self._committed = 0
        self._committing = False
        self._done: dict[int, Answered] = {}

    def depth(self) -> int:
        """Readings of this lane stored and not yet answered."""
        return self.intake.depth(self.key)

    def work(self, stop: threading.Event) -> None:
        """One worker: take, answer, commit in turn, until ``stop``."""
        while not stop.is_set():
            if not self._take.acquire(timeout=0.2):
                continue
            try:  # batches are numbered in the order they are taken
                batch = self.intake.next_batch(
                    self.key,
                    max_messages=self.max_messages,
                    max_delay_s=self.max_delay_s,
                    stop=stop,
                )
                ticket = self._taken
                if batch:
                    self._taken += 1
            finally:
                self._take.release()
            if batch:
                self._commit_in_turn(ticket, batch, self.answer(batch), stop)

    def answer(self, batch: Sequence[StoredReading]) -> Answer:
        """The answers of a batch; a failure of the processor itself answers each alone."""
        readings = [self._reading(stored) for stored in batch]
        bound = [r for r in readings if r is not None]
        try:
            return self.processor.answer(bound)
        except Exception:
            log.exception(
                "batch of %d readings for %s failed; answering one by one", len(bound), self.model
            )
        answer = Answer()
        for reading in bound:
            try:
                part = self.processor.answer([reading])
            except Exception as exc:
                part = Answer([self.processor.failed(reading, exc)])
            answer.outgoing.extend(part.outgoing)
            answer.escalations.extend(part.escalations)
        return answer

    def _reading(self, stored: StoredReading) -> Reading | None:
        binding = self.binding_for(stored.message.topic)
        if binding is None:  # cannot happen after relane() at start; explained all the same
            message = stored.message
            self.intake.database.explain(
                "reading", reading_id_of(message), message.topic, "unbound"
            )
            return None
        return Reading(
            message=stored.message,
            binding=binding,
            sensor=binding.sensor_of(stored.message.topic),
            received_at=stored.received,
        )

    def _commit_in_turn(
        self, ticket: int, batch: Sequence[StoredReading], answer: Answer, stop: threading.Event
    ) -> None:
        """Commit once every earlier batch is committed; whoever commits takes every batch
        that is answered and next in line, so one transaction (one fsync) often holds many."""
        with self._turn:
            self._done[ticket] = (batch, answer)
        while True:
            with self._turn:
                while not (
                    self._committed > ticket
                    or stop.is_set()
                    or (not self._committing and self._committed in self._done)
                ):
                    self._turn.wait(0.1)
                if self._committed > ticket or stop.is_set():
                    return  # committed by another worker, or stopping (the next start redoes it)
                self._committing = True
                first = self._committed
                run: list[Answered] = []
                while first + len(run) in self._done:
                    run.append(self._done.pop(first + len(run)))
            committed = False
            try:
                committed = self._commit(run, stop)
            finally:
                with self._turn:
                    self._committing = False
                    if committed:
                        self._committed = first + len(run)
                    else:
                        self._done.update((first + n, item) for n, item in enumerate(run))
                    self._turn.notify_all()

    def _commit(self, run: list[Answered], stop: threading.Event) -> bool:
        """Store a run of answered batches, retrying while the disk refuses; False if stopped."""
        while True:
            try:
                self.commit(run)
                return True
            except Exception:
                log.exception("could not store the answers of %d batches", len(run))
                if stop.wait(RETRY_S):
                    return False
