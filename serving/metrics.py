"""The edge agent's Prometheus metrics.

Queue and network time are kept apart from compute time, as Triton does: the request
histogram covers the whole request on the agent, the compute histogram only the model.
With several server worker processes, values live in ``multiprocess_dir`` and
:meth:`EdgeMetrics.render` merges every process's values.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.accounting import Answered
from shared.errors import TetherError

disable_created_metrics()

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


class EdgeMetrics:
    """Every metric the agent exports, registered in a registry of its own (the data
    plane reports to it as a :class:`serving.accounting.DataPlaneMetrics`)."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any, Any, Any]] = {}
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
        self.cloud_requests = Counter(
            "tether_cloud_requests",
            "Requests sent up the uplink, by cloud model and outcome "
            "(ok, error, timeout, unreachable, rejected by the open breaker).",
            ["model", "outcome"],
            registry=r,
        )
        self.cloud_round_trip = Histogram(
            "tether_cloud_round_trip_seconds",
            "Time from publishing a cloud request to its reply (network + cloud).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cloud_cost = Counter(
            "tether_cloud_cost_estimate",
            "Estimated cloud cost: cloud-served requests times the operator's price per 1,000.",
            ["model"],
            registry=r,
        )
        self.escalations = Counter(
            "tether_cascade_rows",
            "Rows a cascade saw, by route model and outcome (local, escalated, degraded).",
            ["model", "outcome"],
            registry=r,
        )
        self.breaker_open = Gauge(
            "tether_cloud_breaker_open",
            "1 while the uplink's circuit breaker refuses cloud calls.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.broker_round_trip = Gauge(
            "tether_broker_round_trip_seconds",
            "Fastest of a few round trips through the MQTT broker at start-up, by the QoS of "
            "the question (QoS 1 far slower means the broker lacks TCP_NODELAY).",
            ["qos"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Per-version health for the fleet agent beside the workers (edge/fleet/health_figures.py).
        self.version_errors = Counter(
            "tether_request_errors",
            "Server-side (5xx) failures of requests a model version was chosen for, by model "
            "and version: what a rollout's health window judges.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_samples = Counter(
            "tether_shadow_samples",
            "Rows of sampled requests compared with the cloud teacher, by model and version.",
            ["model", "version"],
            registry=r,
        )
        self.shadow_agreements = Counter(
            "tether_shadow_agreements",
            "Compared rows whose top-1 class agreed with the cloud teacher, by model and version.",
            ["model", "version"],
            registry=r,
        )
        self.registry.register(OffloadRatioCollector(self.requests))

    def record_success(self, answered: Answered) -> None:
        """Count one answered request (label children are cached: this is the hot path)."""
        model, version, served_by = answered.model, answered.version, answered.served_by
        key = (model, version, served_by, answered.route)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(*key),
                self.request_duration.labels(model, version),
                self.compute_duration.labels(model, version, served_by),
                self.inference_flops.labels(served_by),
            )
            self._children[key] = children
        requests, request_duration, compute_duration, inference_flops = children
        requests.inc()
        request_duration.observe(answered.request_s)
        compute_duration.observe(answered.compute_s)
        if answered.flops:
            inference_flops.inc(answered.flops)

    def record_failure(self, model: str, version: str | None, error: TetherError) -> None:
        """Count one failed request; a server-side one also against the version chosen."""
        self.failures.labels(model, error.reason).inc()
        if version is not None and error.status >= 500:
            self.version_errors.labels(model, version).inc()

    def record_run(
        self, model: str, version: str, compute_s: float, requests: int, rows: int
    ) -> None:
        """Nothing per run: the agent's compute histogram is per request (record_success)."""

    def set_model_ready(self, model: str, version: str, provider: str, ready: bool) -> None:
        self.model_ready.labels(model, version, provider).set(1 if ready else 0)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, merged over worker processes."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        source = multiprocess.MultiProcessCollector(merged, path=str(self.multiprocess_dir))
        merged.register(OffloadRatioCollector(source))
        return generate_latest(merged), CONTENT_TYPE_LATEST


class OffloadRatioCollector(Collector):
    """``tether_offload_ratio{model}``: the share of answered requests served by the cloud.

    Derived at scrape time from ``tether_requests`` (merged over worker processes), so it
    is exact however many processes serve.
    """

    def __init__(self, source: Collector) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = {}
        cloud: dict[str, float] = {}
        for family in self._source.collect():
            if family.name != "tether_requests":
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                model = sample.labels.get("model", "")
                totals[model] = totals.get(model, 0.0) + sample.value
                if sample.labels.get("served_by") == "cloud":
                    cloud[model] = cloud.get(model, 0.0) + sample.value
        gauge = GaugeMetricFamily(
            "tether_offload_ratio",
            "Share of answered requests that the cloud served, by model.",
            labels=["model"],
        )
        for model, total in sorted(totals.items()):
            if total > 0:
                gauge.add_metric([model], cloud.get(model, 0.0) / total)
        yield gauge
