"""Health figures for a fleet agent that runs beside the server's worker processes.

In-process, the fleet agent reads a :class:`~edge.health.HealthRecorder` that sits on the
data plane. Beside gunicorn (``tether fleet-agent``) the requests are answered in other
processes, so the figures travel the way an operator's Prometheus sees them:

* every worker puts a :class:`MetricsHealthObserver` and, when it has an uplink, a
  :class:`~edge.shadow.ShadowSampler` on its data plane
  (:func:`install_worker_health`); they count server errors and shadow agreement per
  model version in Prometheus counters (merged over the workers by ``/metrics``);
* the shadow sample rate the fleet agent sets for a version in its health window reaches
  the workers through a small JSON file, ``<data_dir>/run/shadow-rates.json``
  (:class:`FileShadowRates`: written atomically by the agent, re-read by the workers at
  most every half second when it changed);
* the fleet agent's :class:`MetricsHealthSource` scrapes the local ``/metrics`` (with a
  bearer token when the API requires one) and turns it into
  :class:`~edge.health.HealthCounters`: requests (answered + server errors), errors, the
  latency histogram and the shadow counts. The agent judges the difference between the
  window's start and end, as it does in-process.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from edge.access.tokens import ADMIN, read_tokens_file, token_with_scope
from edge.health import LATENCY_BOUNDS_MS, HealthCounters
from edge.settings import EdgeSettings
from edge.shadow import ShadowRates, ShadowSampler, Teacher, uplink_teacher
from serving.metrics import EdgeMetrics
from serving.model_config import load_model_config
from shared.errors import TetherError
from shared.netaddr import bracket

if TYPE_CHECKING:
    from edge.uplink import Uplink
    from serving.dataplane import DataPlane

log = logging.getLogger(__name__)

SHADOW_RATES_FILE = "shadow-rates.json"


def shadow_rates_path(settings: EdgeSettings) -> Path:
    """Where the fleet agent tells the workers which versions to shadow-sample."""
    return settings.data_dir / "run" / SHADOW_RATES_FILE


# ---------------------------------------------------------------------------- shadow rates


class FileShadowRates(ShadowRates):
    """:class:`~edge.shadow.ShadowRates` shared through a file between processes.

    The fleet agent's :meth:`set` and :meth:`clear` write the file (atomically); workers'
    :meth:`get` re-reads it when its modification time changed, checked at most every
    ``refresh_s``, so the hot path costs a clock read.
    """

    def __init__(self, path: Path, *, refresh_s: float = 0.5) -> None:
        super().__init__()
        self.path = Path(path)
        self.refresh_s = refresh_s
        self._checked = float("-inf")
        self._stamp: int | None = None
        self._write_lock = threading.Lock()
        self._refresh(force=True)

    def set(self, model: str, version: str, rate: float) -> None:
        super().set(model, version, rate)
        self._write()

    def clear(self, model: str) -> None:
        super().clear(model)
        self._write()

    def get(self, model: str, version: str) -> float:
        self._refresh()
        return super().get(model, version)

    def _refresh(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.refresh_s:
            return
        self._checked = now
        try:
            stamp = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._stamp is not None:
                self._stamp, self._rates = None, {}
            return
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            rates = {
                (str(model), str(version)): float(rate)
                for model, versions in data.items()
                for version, rate in versions.items()
            }
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("unreadable shadow rates in %s: %s", self.path, exc)
            return
        self._stamp, self._rates = stamp, rates

    def _write(self) -> None:
        nested: dict[str, dict[str, float]] = {}
        for (model, version), rate in sorted(self._rates.items()):
            nested.setdefault(model, {})[version] = rate
        with self._write_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".shadow-")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(nested, handle, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


# ---------------------------------------------------------------------------- worker side


class MetricsHealthObserver:
    """The shadow sampler's recorder: compared rows in Prometheus counters
    (``tether_shadow_samples_total``, ``tether_shadow_agreements_total``).

    Answered requests and their latency are already in ``tether_requests_total`` and
    ``tether_request_duration_seconds``, and the data plane counts server errors per
    version (``tether_request_errors_total``), so nothing else needs observing.
    """

    def __init__(self, metrics: EdgeMetrics) -> None:
        self.metrics = metrics

    def record_shadow(self, model: str, version: str, samples: int, agreements: int) -> None:
        self.metrics.shadow_samples.labels(model, version).inc(samples)
        self.metrics.shadow_agreements.labels(model, version).inc(agreements)


def teacher_through(uplink: Uplink | None, root: Path) -> Teacher | None:
    """The cloud teacher of a worker: the uplink, asking for the model's configured
    ``parameters.teacher`` (or the cloud model of the same name); ``None`` without uplink."""
    if uplink is None:
        return None
    names: dict[str, str] = {}

    def configured(model: str) -> str:
        name = names.get(model)
        if name is None:
            try:
                name = str(load_model_config(root / model).parameters.get("teacher") or model)
            except (OSError, TetherError, ValueError):
                name = model
            names[model] = name
        return name

    return uplink_teacher(uplink, configured)


def install_worker_health(
    settings: EdgeSettings, metrics: EdgeMetrics, dataplane: DataPlane, uplink: Uplink | None
) -> ShadowSampler | None:
    """Put a shadow sampler on a worker's data plane when it has an uplink to a teacher;
    returns the sampler, which the caller starts after the fork and stops.

    The worker passes its parts in: this module never imports the worker (``edge.agent``)."""
    observer = MetricsHealthObserver(metrics)
    teacher = teacher_through(uplink, settings.repository)
    if teacher is None:
        return None
    rates = FileShadowRates(shadow_rates_path(settings))
    sampler = ShadowSampler(teacher, observer, rates)
    dataplane.observers.append(sampler)
    return sampler


# ---------------------------------------------------------------------------- agent side


def _ms_bucket(bound_s: float) -> int:
    """The :data:`LATENCY_BOUNDS_MS` bucket a Prometheus bucket bound falls into
    (the smallest bound at or above it: a p99 read from it errs on the slow side)."""
    return bisect.bisect_left(LATENCY_BOUNDS_MS, bound_s * 1000.0 - 1e-9)


def parse_health(text: str) -> dict[tuple[str, str], HealthCounters]:
    """Per ``(model, version)`` cumulative health counters from a ``/metrics`` text."""
    answered: dict[tuple[str, str], float] = {}
    errors: dict[tuple[str, str], float] = {}
    samples: dict[tuple[str, str], float] = {}
    agreements: dict[tuple[str, str], float] = {}
    cumulative: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = (labels.get("model", ""), labels.get("version", ""))
            name = sample.name
            if name == "tether_requests_total":
                answered[key] = answered.get(key, 0.0) + sample.value
            elif name == "tether_request_errors_total":
                errors[key] = errors.get(key, 0.0) + sample.value
            elif name == "tether_shadow_samples_total":
                samples[key] = samples.get(key, 0.0) + sample.value
            elif name == "tether_shadow_agreements_total":
                agreements[key] = agreements.get(key, 0.0) + sample.value
            elif name == "tether_request_duration_seconds_bucket":
                cumulative.setdefault(key, []).append((float(labels["le"]), sample.value))
    result: dict[tuple[str, str], HealthCounters] = {}
    for key in {*answered, *errors, *samples, *cumulative}:
        buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        below = 0.0
        for bound, count in sorted(cumulative.get(key, [])):
            buckets[_ms_bucket(bound)] += round(count - below)
            below = count
        result[key] = HealthCounters(
            requests=int(answered.get(key, 0.0) + errors.get(key, 0.0)),
            errors=int(errors.get(key, 0.0)),
            buckets=tuple(buckets),
            shadow_samples=int(samples.get(key, 0.0)),
            shadow_agreements=int(agreements.get(key, 0.0)),
        )
    return result


class MetricsHealthSource:
    """A :class:`~edge.health.HealthSource` that scrapes the local server's ``/metrics``.

    One scrape serves the calls of the next ``max_age_s``; a failed scrape keeps the last
    figures (a window judged on stale figures sees fewer requests, never invented ones).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        max_age_s: float = 0.2,
        verify_tls: bool = True,
    ) -> None:
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._context: ssl.SSLContext | None = None
        if url.startswith("https://") and not verify_tls:
            self._context = ssl._create_unverified_context()  # loopback, self-signed
        self._lock = threading.Lock()
        self._scraped_at = float("-inf")
        self._figures: dict[tuple[str, str], HealthCounters] = {}
        #: The last scrape error, for logs and tests ("" after a good scrape).
        self.last_error = ""

    @classmethod
    def from_settings(cls, settings: EdgeSettings) -> MetricsHealthSource:
        """The source for the server these settings describe (``http.host``/``http.port``,
        the first bearer token when the API requires one)."""
        http = settings.http
        host = http.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        scheme = "https" if http.tls.enabled else "http"
        return cls(
            f"{scheme}://{bracket(host)}:{http.port}/metrics",
            token=first_token(settings),
            verify_tls=False,
        )

    def counters(self, model: str, version: str) -> HealthCounters:
        with self._lock:
            if time.monotonic() - self._scraped_at > self.max_age_s:
                self._scrape()
            return self._figures.get((model, version), HealthCounters())

    def _scrape(self) -> None:
        request = urllib.request.Request(self.url)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(
                request, timeout=self.timeout_s, context=self._context
            ) as response:
                text = response.read().decode("utf-8")
            self._figures = parse_health(text)
            self.last_error = ""
        except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors
            if self.last_error != str(exc):
                log.warning("health figures from %s unavailable: %s", self.url, exc)
            self.last_error = str(exc)
        self._scraped_at = time.monotonic()


def first_token(settings: EdgeSettings) -> str | None:
    """A bearer token the local API accepts for ``/metrics`` (the first configured with the
    ``admin`` scope), or ``None``."""
    auth = settings.http.auth
    token = token_with_scope(auth.entries(), ADMIN, auth.default_scopes)
    if token is None and auth.tokens_file is not None:
        try:
            entries, _problems = read_tokens_file(auth.tokens_file)
        except OSError:
            return None
        token = token_with_scope(entries, ADMIN, auth.default_scopes)
    return token
