"""The sensor bridge: the device broker's sensor topics in, inference results out.

Composition (docs/sensors.md)::

    device broker ──> MqttClient (manual ack, persistent session, Receive Maximum)
        └─> MicroBatcher per model (bounded) ─> BatchProcessor ─> DataPlane ─> Router
                                                   └─> Outbox (SQLite) ─> ack the inputs
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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from edge.agent import EdgeAgent
from edge.sensors.batcher import MicroBatcher
from edge.sensors.bindings import Binding, binding_for, build_bindings
from edge.sensors.corrections import CorrectionSender
from edge.sensors.metrics import SensorMetrics
from edge.sensors.outbox import Outbox
from edge.sensors.processor import BatchProcessor
from edge.sensors.publisher import ResultPublisher
from edge.sensors.results import Reading
from edge.session_ids import session_client_id
from edge.settings import EdgeSettings
from shared.mqtt import Message, MqttClient

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


def outbox_path(settings: EdgeSettings) -> Path:
    """Where the bridge keeps its outbox."""
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
        self.outbox = Outbox(
            outbox_path(settings),
            sensors.outbox,
            on_drop=lambda kind, reason, n: self.metrics.drops.labels(kind, reason).inc(n),
        )
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
        self.batchers: dict[tuple[str, str | None], MicroBatcher] = {}
        for binding in self.bindings:
            key = (binding.model, binding.version)
            if key not in self.batchers:
                batcher = MicroBatcher(
                    binding.model,
                    max_messages=sensors.batch.max_messages,
                    max_delay_ms=sensors.batch.max_delay_ms,
                    capacity=sensors.queue_size,
                )
                self.batchers[key] = batcher
                self.metrics.watch_queue(binding.model, batcher.depth)
        self.processor = BatchProcessor(
            self.agent.dataplane, self.outbox, self.metrics, sensors, self.device
        )
        self.publisher = ResultPublisher(
            self.client,
            self.outbox,
            self.metrics,
            window=sensors.outbox.publish_window,
            qos=sensors.qos,
        )
        self.corrections = CorrectionSender(
            self.agent.dataplane, self.agent.uplink, self.outbox, self.publisher
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
        for key, batcher in self.batchers.items():
            self._spawn(f"sensors-{key[0]}", partial(self._work, batcher))
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

        Readings in memory are not acknowledged, so the broker delivers them again to the
        next start; results in the outbox are published by the next start.
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
        self.outbox.close()
        self.agent.close()

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------ the pipe

    def _on_message(self, message: Message) -> None:
        """Network thread: find the binding and queue the reading (blocks only when full)."""
        binding = binding_for(self.bindings, message.topic)
        if binding is None:  # a filter of an old session; nothing is bound to it now
            message.ack()
            return
        self.metrics.messages_in.labels(binding.model).inc()
        reading = Reading(message=message, binding=binding, sensor=binding.sensor_of(message.topic))
        self.batchers[(binding.model, binding.version)].put(reading, self._stop)

    def _work(self, batcher: MicroBatcher) -> None:
        while not self._stop.is_set():
            batch = batcher.next_batch(self._stop)
            if not batch:
                continue
            try:
                self.processor.process(batch)
            except Exception:
                # Not acknowledged: the broker delivers these again after a reconnect.
                log.exception("batch of %d readings for %s failed", len(batch), batcher.model)
                continue
            self.publisher.wake()

    # ------------------------------------------------------------------ visibility

    def stats(self) -> dict[str, Any]:
        """Messages in, results out, errors, drops, queue depth, outbox depth and age."""
        outbox = self.outbox.stats()
        self.metrics.outbox_depth.labels("results").set(outbox.results)
        self.metrics.outbox_depth.labels("escalations").set(outbox.escalations)
        self.metrics.outbox_age.set(outbox.oldest_age_s)
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
            "queue_depth": {b.model: b.depth() for b in self.batchers.values()},
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
