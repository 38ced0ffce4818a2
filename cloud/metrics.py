"""The cloud worker's Prometheus metrics, and the HTTP endpoint that serves them.

As in Triton, queue time (arrival to the start of the batch) is kept apart from compute
time (inside the runtime), and the batch-size histogram shows how well dynamic batching
is combining requests.
"""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from serving.accounting import Answered
from serving.metrics import LATENCY_BUCKETS  # one latency scale for edge and cloud
from shared.errors import TetherError

disable_created_metrics()

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CloudMetrics:
    """Every metric a cloud worker exports, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tether_cloud_requests",
            "Inference requests answered with a result, by model and version.",
            ["model", "version"],
            registry=r,
        )
        self.failures = Counter(
            "tether_cloud_failures",
            "Requests not answered with a result, by model and reason (expired, overloaded...).",
            ["model", "reason"],
            registry=r,
        )
        self.queue_time = Histogram(
            "tether_cloud_queue_seconds",
            "Time from a request's arrival to the start of the batch that runs it.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "tether_cloud_compute_seconds",
            "Time one batch spent inside the model runtime.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tether_cloud_batch_size",
            "Rows the runtime ran at once (1 per request of batch size 1 when not batched).",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "tether_cloud_batch_requests",
            "Requests combined into one runtime call.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "tether_cloud_inflight",
            "Requests accepted and not yet answered (queued or running).",
            registry=r,
        )
        self.duplicates = Counter(
            "tether_cloud_duplicates",
            "Duplicate deliveries of a request id: dropped, or the cached answer re-sent.",
            ["outcome"],
            registry=r,
        )
        self.model_ready = Gauge(
            "tether_cloud_model_ready",
            "1 when a model version is loaded and warmed up, with its execution provider.",
            ["model", "version", "provider"],
            registry=r,
        )

    # ------------------------------------------------------------ the data plane's reports
    # (serving.accounting.DataPlaneMetrics, under the worker's own metric names)

    def record_success(self, answered: Answered) -> None:
        self.requests.labels(answered.model, answered.version).inc()

    def record_failure(self, model: str, version: str | None, error: TetherError) -> None:
        self.failures.labels(model, error.reason).inc()

    def record_run(
        self, model: str, version: str, compute_s: float, requests: int, rows: int
    ) -> None:
        self.compute_time.labels(model, version).observe(compute_s)
        self.batch_size.labels(model).observe(rows)
        self.batch_requests.labels(model).observe(requests)

    def set_model_ready(self, model: str, version: str, provider: str, ready: bool) -> None:
        self.model_ready.labels(model, version, provider).set(1 if ready else 0)

    def sample(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has not been recorded yet)."""
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class MetricsServer:
    """The ``/metrics`` HTTP endpoint on a thread of its own."""

    def __init__(self, metrics: CloudMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server, thread = start_http_server(self.port, self.host, registry=self.metrics.registry)
        self._server, self._thread = server, thread
        self.port = int(server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
