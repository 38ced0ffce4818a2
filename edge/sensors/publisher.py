"""Publishes the outbox's results to the device broker, in order, deleting each after PUBACK.

A window of results is published, then each PUBACK is awaited in order; the acknowledged
prefix is deleted from the outbox. When the connection drops, what was not acknowledged
stays and goes out again after the reconnect: a result is published more than once only
if the broker took it but the agent did not record that (crash or disconnect in between),
and the copy has the same reading id.
"""

from __future__ import annotations

import logging
import threading
import time

from edge.sensors.metrics import SensorMetrics
from edge.sensors.outbox import Outbox
from shared.mqtt import Delivery, MqttClient, MqttError

log = logging.getLogger(__name__)

PUBACK_TIMEOUT_S = 10.0


class ResultPublisher:
    """The thread that drains the outbox's results to the broker."""

    def __init__(
        self, client: MqttClient, outbox: Outbox, metrics: SensorMetrics, *, window: int, qos: int
    ) -> None:
        self.client = client
        self.outbox = outbox
        self.metrics = metrics
        self.window = window
        self.qos = qos
        self._wake = threading.Event()

    def wake(self) -> None:
        """New results are in the outbox."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.client.connected:
                stop.wait(0.1)
                continue
            self._wake.clear()
            rows = self.outbox.peek_results(self.window)
            if not rows:
                self._wake.wait(0.2)
                continue
            sent: list[tuple[int, str, Delivery]] = []
            for row in rows:
                try:
                    info = self.client.publish(
                        row.topic,
                        row.payload,
                        qos=self.qos,
                        correlation_data=row.correlation,
                        content_type="application/json",
                    )
                except MqttError as exc:
                    log.info("results wait in the outbox: %s", exc.message)
                    break
                sent.append((row.seq, row.kind, info))
            done: list[int] = []
            kinds: dict[str, int] = {}
            for seq, kind, info in sent:
                if not self._acknowledged(info, stop):
                    break
                done.append(seq)
                kinds[kind] = kinds.get(kind, 0) + 1
            self.outbox.delete_results(done)
            for kind, count in kinds.items():
                self.metrics.results_out.labels(kind).inc(count)
            if len(done) < len(sent):
                stop.wait(0.2)

    def _acknowledged(self, info: Delivery, stop: threading.Event) -> bool:
        """Wait for the PUBACK while connected; False when it will not come on this connection."""
        deadline = time.monotonic() + PUBACK_TIMEOUT_S
        while not info.is_published():
            if not self.client.connected or stop.is_set() or time.monotonic() > deadline:
                return False
            try:
                info.wait_for_publish(0.05)
            except MqttError:
                return False
        return True
