"""Prometheus metrics of the fleet service, read from the fleet database at scrape time.

Served on the artifact server's ``/metrics`` by ``tether fleet serve``; the Grafana
dashboard's rollout panels use them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud.fleet_db import ACTIVE_STATES, FleetDB

#: Finished rollouts kept on the metrics (the newest ones), besides every unfinished one.
RECENT_FINISHED = 10


class FleetCollector(Collector):
    """Devices by online state; per rollout, devices per step and the current wave; device
    reports the controllers dropped, by reason."""

    def __init__(self, db: FleetDB | None) -> None:
        self.db = db

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        devices = GaugeMetricFamily(
            "tether_fleet_devices",
            "Devices known to the fleet, by online state.",
            labels=["online"],
        )
        steps = GaugeMetricFamily(
            "tether_rollout_devices",
            "Devices of a rollout at each step (waiting, downloading, active, committed, ...).",
            labels=["rollout", "model", "version", "state", "step"],
        )
        waves = GaugeMetricFamily(
            "tether_rollout_wave", "The wave a rollout is in (1-based).", labels=["rollout"]
        )
        dropped = CounterMetricFamily(
            "tether_fleet_reports_dropped",
            "Device statuses and rollout events the controller dropped, by reason: invalid "
            "(refused when read: malformed, too large or too deep), inbox_full, store_failed, "
            "unknown_rollout (an event for a rollout its device is not in).",
            labels=["reason"],
        )
        if self.db is not None:
            for reason, count in sorted(self.db.intake_drops().items()):
                dropped.add_metric([reason], count)
            known = self.db.list_devices()
            online = sum(1 for d in known if d.online)
            devices.add_metric(["true"], online)
            devices.add_metric(["false"], len(known) - online)
            rollouts = sorted(self.db.list_rollouts(), key=lambda r: r.created_at, reverse=True)
            finished = [r for r in rollouts if r.state not in ACTIVE_STATES][:RECENT_FINISHED]
            for rollout in [r for r in rollouts if r.state in ACTIVE_STATES] + finished:
                counts: dict[str, int] = {}
                for device in self.db.rollout_devices(rollout.id):
                    step = device.step or "waiting"
                    counts[step] = counts.get(step, 0) + 1
                labels = [rollout.id, rollout.model, str(rollout.version), rollout.state]
                for step, count in sorted(counts.items()):
                    steps.add_metric([*labels, step], count)
                waves.add_metric([rollout.id], rollout.wave + 1)
        yield devices
        yield steps
        yield waves
        yield dropped


class FleetMetrics:
    """The fleet service's metrics registry."""

    def __init__(self, db: FleetDB | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(db))

    def render(self) -> bytes:
        return generate_latest(self.registry)
