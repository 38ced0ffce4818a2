"""The edge agent's Prometheus metrics.

Queue and network time are kept apart from compute time, as Triton does: the request
histogram covers the whole request on the agent, the compute histogram only the model.
With several server worker processes, values live in ``multiprocess_dir`` and
:meth:`EdgeMetrics.render` merges every process's values.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


class EdgeMetrics:
    """Every metric the agent exports, registered in a registry of its own."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        r = self.registry
        self.requests = Counter(
            "tether_requests",
            "Inference requests answered, by model, version, where served and route taken.",
            ["model", "version", "served_by", "route"],
            registry=r,
        )
        self.failures = Counter(
            "tether_request_failures",
            "Inference requests that failed, by model and reason.",
            ["model", "reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tether_request_duration_seconds",
            "Time from request arrival to response on the agent (queue + compute + network).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "tether_compute_duration_seconds",
            "Time spent inside the model runtime.",
            ["model", "version", "served_by"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_ready = Gauge(
            "tether_model_ready",
            "1 when a model version is loaded and warmed up, with its execution provider.",
            ["model", "version", "provider"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.inference_flops = Counter(
            "tether_inference_flops",
            "FLOPs spent on inference, by where they were spent.",
            ["served_by"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, merged over worker processes."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))
        return generate_latest(merged), CONTENT_TYPE_LATEST
