"""The sensor bridge's Prometheus metrics, registered beside the data plane's.

Messages in, results out, errors by reason, skipped redeliveries, readings waiting in the
intake (by model, and the oldest's age), outbox depth and age, and drops by reason. :meth:`SensorMetrics.snapshot` gives the same figures
as plain numbers (for ``stats()`` and ``tether status``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SensorMetrics:
    """Every metric of the bridge, in ``registry`` (the agent's, so one scrape has both)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry(auto_describe=True)
        self.registry = r
        self.messages_in = Counter(
            "tether_sensor_messages", "Sensor messages received, by model.", ["model"], registry=r
        )
        self.results_out = Counter(
            "tether_sensor_results",
            "Messages published for readings, by kind (result, error, correction).",
            ["kind"],
            registry=r,
        )
        self.errors = Counter(
            "tether_sensor_errors",
            "Readings answered with an error message, by model and reason.",
            ["model", "reason"],
            registry=r,
        )
        self.redeliveries = Counter(
            "tether_sensor_redeliveries_skipped",
            "Messages the broker redelivered that were already answered (acknowledged only).",
            registry=r,
        )
        self.degraded = Counter(
            "tether_sensor_degraded",
            "Readings answered locally because the cloud could not be reached.",
            ["model"],
            registry=r,
        )
        self.drops = Counter(
            "tether_sensor_drops",
            "Records dropped, by kind (result, error, correction, escalation) and reason.",
            ["kind", "reason"],
            registry=r,
        )
        self.batch_size = Histogram(
            "tether_sensor_batch_size",
            "Readings per micro-batch.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.queue_depth = Gauge(
            "tether_sensor_queue_depth",
            "Readings stored in the intake and not yet answered, by model.",
            ["model"],
            registry=r,
        )
        self.intake_age = Gauge(
            "tether_sensor_intake_oldest_age_seconds",
            "Age of the oldest reading waiting in the intake.",
            registry=r,
        )
        self.outbox_depth = Gauge(
            "tether_sensor_outbox_depth",
            "Records waiting in the outbox, by kind (results, escalations).",
            ["kind"],
            registry=r,
        )
        self.outbox_age = Gauge(
            "tether_sensor_outbox_oldest_age_seconds",
            "Age of the oldest record waiting in the outbox.",
            registry=r,
        )

    def watch_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Report ``depth()`` as the model's queue depth at every scrape."""
        self.queue_depth.labels(model).set_function(depth)

    def snapshot(self) -> dict[str, Any]:
        """Counter totals as plain numbers, by metric and label values."""
        figures: dict[str, Any] = {}
        for metric in (
            self.messages_in,
            self.results_out,
            self.errors,
            self.redeliveries,
            self.degraded,
            self.drops,
        ):
            for family in metric.collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    label = "/".join(sample.labels.values()) or "all"
                    figures.setdefault(family.name, {})[label] = int(sample.value)
        return figures
