"""Delivered messages into the durable intake, then their PUBACKs: the bridge's front door.

The MQTT network thread only appends a delivered message to a small buffer; the receiver
thread stores everything buffered in one transaction (one fsync for the group) and then
acknowledges each message, in the order they came (MQTT 5 wants PUBACKs in order). A
message is thus acknowledged exactly when it is durably stored (or counted as dropped by
the intake's policy, or known as a redelivery of one already stored).

The buffer holds at most the bridge's MQTT Receive Maximum of messages (the broker sends
no more unacknowledged QoS 1 messages than that) and :data:`BUFFER_BYTES`; past either,
the network thread waits, so the broker keeps the rest in flight on its side.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from edge.sensors.intake import Intake
from edge.sensors.metrics import SensorMetrics
from shared.mqtt import Message

log = logging.getLogger(__name__)

#: Payload bytes delivered and not yet stored, past which the network thread waits.
BUFFER_BYTES = 32 * 1024 * 1024
#: Wait after a failed store (the disk is full or broken) before trying again.
RETRY_S = 1.0


class Receiver:
    """The thread that moves delivered messages into the intake and acknowledges them."""

    def __init__(
        self,
        intake: Intake,
        metrics: SensorMetrics,
        *,
        max_messages: int,
        max_bytes: int = BUFFER_BYTES,
    ) -> None:
        self.intake = intake
        self.metrics = metrics
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._buffer: deque[tuple[Message, str]] = deque()
        self._bytes = 0
        self._ready = threading.Condition()

    def deliver(self, message: Message, lane: str, stop: threading.Event) -> None:
        """Network thread: buffer a message for the intake (waits only while the buffer is full)."""
        size = len(message.payload)
        with self._ready:
            while (
                self._buffer
                and (len(self._buffer) >= self.max_messages or self._bytes + size > self.max_bytes)
                and not stop.is_set()
            ):
                self._ready.wait(0.1)
            self._buffer.append((message, lane))
            self._bytes += size
            self._ready.notify_all()

    def depth(self) -> int:
        """Messages delivered and not yet stored."""
        return len(self._buffer)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            with self._ready:
                if not self._buffer:
                    self._ready.wait(0.2)
                    continue
                group = list(self._buffer)
            try:
                added = self.intake.add(group)
            except Exception:
                # Not acknowledged: they stay buffered, and the broker keeps the rest.
                log.exception("could not store %d readings in the intake", len(group))
                stop.wait(RETRY_S)
                continue
            for message, _lane in group:
                message.ack()
            with self._ready:
                for _ in group:
                    message, _lane = self._buffer.popleft()
                    self._bytes -= len(message.payload)
                self._ready.notify_all()
            if added.skipped:
                self.metrics.redeliveries.inc(added.skipped)
