"""``tether status``: what the edge agent is doing, read from its own metrics endpoints.

The agent's HTTP API (``/metrics``) and, when running, the sensor bridge's metrics port
are scraped and summarised for a terminal: models and their execution providers, traffic
by where it was served, offload ratio, cloud cost estimate, cloud health, and the sensor
pipeline's queue and outbox, and what the broker costs a round trip (with a warning when
it lacks a setting that Tether's QoS 1 traffic needs, see edge/broker_check.py).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import click
from prometheus_client.parser import text_string_to_metric_families

from edge.broker_check import BrokerCheck


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Scrape:
    """The samples of one metrics endpoint."""

    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = [
            Sample(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]
        return cls(samples)

    def select(self, name: str, **labels: str) -> Iterable[Sample]:
        return (
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.select(name, **labels))


def fetch(url: str, token: str | None = None, timeout_s: float = 3.0) -> str:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return str(response.read().decode())


def bar(fraction: float, width: int = 24) -> str:
    """A text progress bar: ``[#########---------]  45%``."""
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction:4.0%}"


def render_edge(scrape: Scrape) -> list[str]:
    """The agent's section of the status report."""
    lines = ["Models"]
    ready = [s for s in scrape.select("tether_model_ready") if s.value > 0]
    if not ready:
        lines.append("  (none ready)")
    for s in sorted(ready, key=lambda s: (s.labels["model"], s.labels["version"])):
        lines.append(f"  {s.labels['model']:<24} v{s.labels['version']:<4} {s.labels['provider']}")
    by_side: dict[str, float] = defaultdict(float)
    by_route: dict[str, float] = defaultdict(float)
    for s in scrape.select("tether_requests_total"):
        by_side[s.labels.get("served_by", "?")] += s.value
        by_route[s.labels.get("route", "?")] += s.value
    total = sum(by_side.values())
    failures = scrape.total("tether_request_failures_total")
    cloud = by_side.get("cloud", 0.0)
    lines += [
        "",
        "Traffic",
        f"  requests answered   {total:,.0f}  (edge {by_side.get('edge', 0):,.0f}, cloud {cloud:,.0f})",
        f"  failed              {failures:,.0f}",
        f"  offload to cloud    {bar(cloud / total if total else 0.0)}",
        "  by route            "
        + (", ".join(f"{k} {v:,.0f}" for k, v in sorted(by_route.items())) or "none"),
        f"  FLOPs               edge {scrape.total('tether_inference_flops_total', served_by='edge'):,.0f}"
        f", cloud {scrape.total('tether_inference_flops_total', served_by='cloud'):,.0f}",
        f"  cloud cost estimate {scrape.total('tether_cloud_cost_estimate_total'):,.4f}",
    ]
    breaker = scrape.total("tether_cloud_breaker_open")
    cloud_ok = scrape.total("tether_cloud_requests_total", outcome="ok")
    cloud_all = scrape.total("tether_cloud_requests_total")
    lines += [
        "",
        "Cloud uplink",
        f"  circuit breaker     {'OPEN (cloud failing; local answers marked degraded)' if breaker else 'closed'}",
        f"  cloud requests      {cloud_all:,.0f} ({cloud_ok:,.0f} ok)",
        f"  broker round trip   {render_broker(scrape)}",
    ]
    return lines


def render_broker(scrape: Scrape) -> str:
    """The uplink's start-up measurement of the broker, and what it means."""
    times = {
        s.labels.get("qos"): s.value for s in scrape.select("tether_broker_round_trip_seconds")
    }
    if "0" not in times or "1" not in times:
        return "not measured (no uplink, or the broker refused the probe topic)"
    check = BrokerCheck(qos0_ms=times["0"] * 1000.0, qos1_ms=times["1"] * 1000.0)
    measured = f"{check.qos0_ms:.2f} ms at QoS 0, {check.qos1_ms:.2f} ms at QoS 1"
    advice = check.advice()
    return (
        f"{measured}\n  WARNING: {advice}" if advice else f"{measured} (no broker setting missing)"
    )


def render_bridge(scrape: Scrape) -> list[str]:
    """The sensor bridge's section: any ``tether_sensor_*`` gauges and counters."""
    lines = ["", "Sensor bridge"]
    names = sorted({s.name for s in scrape.samples if s.name.startswith("tether_sensor")})
    if not names:
        return [*lines, "  (no sensor metrics)"]
    for name in names:
        if name.endswith(("_bucket", "_created")):
            continue
        value = sum(s.value for s in scrape.select(name))
        lines.append(f"  {name.removeprefix('tether_sensor_'):<28} {value:,.2f}")
    return lines


@click.command("status")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="Edge API.")
@click.option(
    "--bridge-url",
    default="http://127.0.0.1:9102/metrics",
    show_default=True,
    help="Sensor bridge metrics endpoint.",
)
@click.option("--token", envvar="TETHER_API_TOKEN", help="API token, if the API needs one.")
def status_command(url: str, bridge_url: str, token: str | None) -> None:
    """Summarise the running edge agent (and sensor bridge) in the terminal."""
    try:
        scrape = Scrape.parse(fetch(url.rstrip("/") + "/metrics", token))
    except (urllib.error.URLError, OSError) as exc:
        raise click.ClickException(f"no edge agent answers at {url}: {exc}") from exc
    lines = [f"Tether edge agent at {url}", "", *render_edge(scrape)]
    try:
        lines += render_bridge(Scrape.parse(fetch(bridge_url)))
    except (urllib.error.URLError, OSError):
        lines += ["", f"Sensor bridge: not running (nothing at {bridge_url})"]
    click.echo("\n".join(lines))
