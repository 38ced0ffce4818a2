"""Micro-batching: a bounded queue of readings per model, emptied in batches.

A batch closes when it holds ``max_messages`` readings or ``max_delay_ms`` after its
first reading arrived, whichever comes first. The queue is bounded: :meth:`put` blocks
when it is full, and the bridge sizes the MQTT Receive Maximum to the queue, so the
broker holds back further messages instead of the agent's memory growing.
"""

from __future__ import annotations

import queue
import threading
import time

from edge.sensors.results import Reading


class MicroBatcher:
    """The readings waiting for one model, handed out as micro-batches."""

    def __init__(
        self, model: str, *, max_messages: int, max_delay_ms: float, capacity: int
    ) -> None:
        self.model = model
        self.max_messages = max_messages
        self.max_delay_s = max_delay_ms / 1000.0
        self._queue: queue.Queue[Reading] = queue.Queue(maxsize=capacity)

    def put(self, reading: Reading, stop: threading.Event | None = None) -> bool:
        """Queue a reading, waiting while the queue is full; False if stopped meanwhile."""
        while True:
            try:
                self._queue.put(reading, timeout=0.1)
                return True
            except queue.Full:
                if stop is not None and stop.is_set():
                    return False

    def depth(self) -> int:
        return self._queue.qsize()

    def next_batch(self, stop: threading.Event, idle_s: float = 0.2) -> list[Reading]:
        """The next batch; empty when nothing came within ``idle_s`` or ``stop`` is set."""
        try:
            first = self._queue.get(timeout=idle_s)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_delay_s
        while len(batch) < self.max_messages and not stop.is_set():
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch
