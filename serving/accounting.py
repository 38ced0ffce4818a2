"""What the data plane counts, and the readiness gauge both sides keep.

Each side exports its own metric names (a public contract: dashboards and alerts read
them), so the data plane does not name metrics: it reports to a :class:`DataPlaneMetrics`,
which :class:`serving.metrics.EdgeMetrics` (``tether_*``) and
:class:`cloud.metrics.CloudMetrics` (``tether_cloud_*``) each implement.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from serving.repository import ModelRepository
from shared.errors import TetherError


@dataclass(slots=True)
class Answered:
    """One answered request, as the data plane reports it."""

    model: str
    version: str
    #: ``edge`` or ``cloud``, and the route it took (``local``, ``escalated``, ...).
    served_by: str
    route: str
    #: The whole request on this side, and the runtime call that answered it.
    request_s: float
    compute_s: float
    #: FLOPs spent on it where the data plane can tell (0 when unknown).
    flops: int


class DataPlaneMetrics(Protocol):
    """Where the data plane reports what it did."""

    def record_success(self, answered: Answered) -> None:
        """One request answered."""

    def record_failure(self, model: str, version: str | None, error: TetherError) -> None:
        """One request failed (``version``: the runtime chosen for it, ``None`` if none was)."""

    def record_run(
        self, model: str, version: str, compute_s: float, requests: int, rows: int
    ) -> None:
        """One call of a runtime, which answered ``requests`` requests of ``rows`` rows."""

    def set_model_ready(self, model: str, version: str, provider: str, ready: bool) -> None:
        """Whether a served model version is loaded and warmed up."""


class ReadinessGauge:
    """Keeps a side's model-ready gauge equal to what its repositories serve: 1 or 0 for
    each served version, and 0 for a version published before and no longer served."""

    def __init__(self, metrics: DataPlaneMetrics) -> None:
        self.metrics = metrics
        self._published: dict[tuple[str, str], str] = {}

    def publish(self, repositories: Iterable[ModelRepository]) -> None:
        current: dict[tuple[str, str], str] = {}
        seen: list[ModelRepository] = []
        for repository in repositories:
            if any(repository is other for other in seen):
                continue
            seen.append(repository)
            for name, versions in repository.served().items():
                for version, runtime in versions.items():
                    current[(name, version)] = runtime.provider
                    self.metrics.set_model_ready(name, version, runtime.provider, runtime.ready)
        for (name, version), provider in self._published.items():
            if (name, version) not in current:
                self.metrics.set_model_ready(name, version, provider, False)
        self._published = current
