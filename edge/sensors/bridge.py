"""The sensor bridge: the device broker's sensor topics in, inference results out.

Composition (docs/sensors.md)::

    device broker ──> MqttClient (manual ack, persistent session, Receive Maximum)
        └─> Receiver ─> Intake (SQLite) ─> PUBACK
              Lane per model: N workers ─> BatchProcessor ─> DataPlane ─> Router
                  └─> in order: answers into the Outbox, readings out of the Intake (one txn)
        <── ResultPublisher (outbox -> broker, delete after PUBACK)
    cloud broker <── Uplink (separate connection) <── CorrectionSender (stored escalations)

The bridge is thin: it turns payloads into :class:`~shared.codec.DecodedRequest` objects and
predictions into messages; validation, routing and accounting are the data plane's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from edge.agent import EdgeAgent
from edge.sensors.bindings import Binding, binding_for, build_bindings
from edge.sensors.corrections import CorrectionSender
from edge.sensors.database import SensorDatabase
from edge.sensors.intake import Intake
from edge.sensors.lanes import Answered, Lane
from edge.sensors.metrics import SensorMetrics
from edge.sensors.outbox import Outbox
from edge.sensors.processor import BatchProcessor
from edge.sensors.publisher import ResultPublisher
from edge.sensors.receiver import Receiver
from edge.session_ids import session_client_id
from edge.settings import EdgeSettings
from shared.mqtt import Message, MqttClient

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0
#: Sensor topics whose binding is remembered (a sensor population larger than this only
#: costs a topic-filter match per reading).
TOPICS_REMEMBERED = 4096


def outbox_path(settings: EdgeSettings) -> Path:
    """Where the bridge keeps its intake and outbox (one SQLite file)."""
    return settings.data_dir / "sensors" / "outbox.sqlite3"


def stats_path(settings_or_dir: EdgeSettings | Path) -> Path:
    """Where the running bridge writes its figures every second (for ``tether status``)."""
    data_dir = (
        settings_or_dir.data_dir if isinstance(settings_or_dir, EdgeSettings) else settings_or_dir
    )
    return data_dir / "run" / "sensor-bridge.json"


def read_stats(data_dir: Path) -> dict[str, Any] | None:
    """The figures a running (or the last) bridge wrote; None when there are none."""
    try:
        data = json.loads(stats_path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lane_key(binding: Binding) -> str:
    """The intake lane of a binding's readings: its model and version."""
    return f"{binding.model}@{binding.version or ''}"


def client_id_of(settings: EdgeSettings) -> str:
    """The fixed client id whose persistent session keeps unacknowledged readings:
    ``tether-bridge-<device>-<this device's secret tag>`` (edge/session_ids.py)."""
    return settings.sensors.client_id or session_client_id(
        settings.data_dir, "bridge", settings.device_id
    )


class SensorBridge:
    """Sensor topics bound to models, answered durably (``tether bridge``)."""

    def __init__(self, settings: EdgeSettings, *, agent: EdgeAgent | None = None) -> None:
        self.settings = settings
        sensors = settings.sensors
        self.device = settings.device_id
        self.agent = agent or EdgeAgent(settings)
        self.metrics = SensorMetrics(self.agent.metrics.registry)
        self.bindings = build_bindings(sensors.bindings, self.device)
        self._topics: dict[str, Binding | None] = {}
        self.database = SensorDatabase(
            outbox_path(settings),
            sensors.outbox.synchronous,
            on_drop=lambda kind, reason, n: self.metrics.drops.labels(kind, reason).inc(n),
        )
        self.intake = Intake(self.database, sensors.intake)
        self.outbox = Outbox(self.database, sensors.outbox)
        self.client = MqttClient(
            sensors.broker_url or settings.mqtt_url,
            client_id_of(settings),
            manual_ack=True,
            clean_start=False,
            session_expiry_s=sensors.session_expiry_s,
            receive_maximum=sensors.queue_size,
            max_inflight=sensors.outbox.publish_window,
            tls=settings.mqtt_tls_config(),
        )
        self.receiver = Receiver(self.intake, self.metrics, max_messages=sensors.queue_size)
        self.processor = BatchProcessor(self.agent.dataplane, self.metrics, sensors, self.device)
        self.lanes: dict[str, Lane] = {}
        for binding in self.bindings:
            key = lane_key(binding)
            if key not in self.lanes:
                self.lanes[key] = Lane(
                    key,
                    binding.model,
                    self._binding_for,
                    self.intake,
                    self.processor,
                    self._commit,
                    max_messages=sensors.batch.max_messages,
                    max_delay_ms=sensors.batch.max_delay_ms,
                )
                self.metrics.watch_queue(binding.model, self.lanes[key].depth)
        self.publisher = ResultPublisher(
            self.client,
            self.outbox,
            self.metrics,
            window=sensors.outbox.publish_window,
            qos=sensors.qos,
        )
        self.corrections = CorrectionSender(
            self.agent.dataplane,
            self.agent.uplink,
            self.outbox,
            self.publisher,
            in_flight=sensors.batches_in_flight,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._metrics_server: Any = None
        self.started_at = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self, connect_wait_s: float | None = None) -> None:
        """Load the models, then take readings (the broker may come later)."""
        self.started_at = time.time()
        self.agent.start()
        self._stop.clear()
        unbound = self.intake.relane(set(self.lanes), self._lane_of)
        if unbound:
            log.warning("%d stored readings match no binding any more; dropped", unbound)
        self._spawn("sensors-receiver", lambda: self.receiver.run(self._stop))
        for key, lane in self.lanes.items():
            for n in range(self.settings.sensors.batches_in_flight):
                self._spawn(f"sensors-{key}-{n}", partial(lane.work, self._stop))
        self._spawn("sensors-publisher", lambda: self.publisher.run(self._stop))
        self._spawn("sensors-corrections", lambda: self.corrections.run(self._stop))
        self._spawn("sensors-stats", self._report)
        for binding in self.bindings:
            self.client.subscribe(
                binding.topic_filter, self._on_message, qos=self.settings.sensors.qos
            )
        port = self.settings.sensors.metrics_port
        if port is not None:
            self._metrics_server, _ = start_http_server(
                port, self.settings.sensors.metrics_host, registry=self.metrics.registry
            )
        self.client.start(wait_s=connect_wait_s)
        log.info(
            "sensor bridge %s on %s: %s",
            self.client.client_id,
            self.client.address.url(),
            ", ".join(f"{b.topic_filter} -> {b.model}" for b in self.bindings),
        )

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None:
            return None
        return int(self._metrics_server.server_port)

    def stop(self) -> None:
        """Stop taking readings, finish the threads, close the outbox and the uplink.

        Readings in the intake are answered, and results in the outbox published, by the
        next start; readings delivered but not yet stored were not acknowledged, so the
        broker delivers them again.
        """
        self.client.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        self._write_stats()
        self.database.close()
        self.agent.close()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------ the pipe

    def _binding_for(self, topic: str) -> Binding | None:
        """The binding of a topic (remembered for the last :data:`TOPICS_REMEMBERED` topics)."""
        try:
            return self._topics[topic]
        except KeyError:
            pass
        binding = binding_for(self.bindings, topic)
        if len(self._topics) >= TOPICS_REMEMBERED:
            self._topics.clear()
        self._topics[topic] = binding
        return binding

    def _lane_of(self, topic: str) -> str | None:
        binding = self._binding_for(topic)
        return lane_key(binding) if binding is not None else None

    def _on_message(self, message: Message) -> None:
        """Network thread: find the binding and hand the reading to the intake's receiver."""
        binding = self._binding_for(message.topic)
        if binding is None:  # a filter of an old session; nothing is bound to it now
            message.ack()
            return
        self.metrics.messages_in.labels(binding.model).inc()
        self.receiver.deliver(message, lane_key(binding), self._stop)

    def _commit(self, run: Sequence[Answered]) -> None:
        """Answers into the outbox and their readings out of the intake, in one transaction."""
        with self.database.transaction():
            for batch, answer in run:
                self.intake.remove(batch)
                self.outbox.store(answer.outgoing, answer.escalations)
        self.publisher.wake()

    # ------------------------------------------------------------------ visibility

    def stats(self) -> dict[str, Any]:
        """Messages in, results out, errors, drops, queue depth, outbox depth and age."""
        outbox = self.outbox.stats()
        self.metrics.outbox_depth.labels("results").set(outbox.results)
        self.metrics.outbox_depth.labels("escalations").set(outbox.escalations)
        self.metrics.outbox_age.set(outbox.oldest_age_s)
        intake_age = self.intake.oldest_age_s()
        self.metrics.intake_age.set(intake_age)
        counters = self.metrics.snapshot()
        return {
            "device": self.device,
            "client_id": self.client.client_id,
            "broker": self.client.address.url(),
            "connected": self.client.connected,
            "cloud_connected": self.agent.uplink.connected if self.agent.uplink else None,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "bindings": [_describe(b) for b in self.bindings],
            "messages_in": sum(counters.get("tether_sensor_messages", {}).values()),
            "results_out": counters.get("tether_sensor_results", {}),
            "errors": counters.get("tether_sensor_errors", {}),
            "degraded": sum(counters.get("tether_sensor_degraded", {}).values()),
            "redeliveries_skipped": sum(
                counters.get("tether_sensor_redeliveries_skipped", {}).values()
            ),
            "queue_depth": {lane.model: lane.depth() for lane in self.lanes.values()},
            "intake": {
                "readings": self.intake.depth(),
                "bytes": self.intake.bytes,
                "oldest_age_s": round(intake_age, 3),
                "unstored": self.receiver.depth(),
            },
            "outbox": outbox.as_dict(),
            "drops": outbox.dropped,
        }

    def _report(self) -> None:
        while not self._stop.wait(STATS_INTERVAL_S):
            self._write_stats()

    def _write_stats(self) -> None:
        with contextlib.suppress(Exception):  # figures are best effort; never stop the bridge
            path = stats_path(self.settings)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.stats(), indent=1, default=str))
            tmp.replace(path)


def _describe(binding: Binding) -> dict[str, Any]:
    return {"topic": binding.topic_filter, "model": binding.model, "version": binding.version}
