"""Provenance: where and how one answer was produced, typed, and rendered once per transport.

Every answer says where it was served. The runtime that answers builds a
:class:`Provenance` (a local runtime: the defaults; the uplink's cloud runtime: the cloud
model, worker and times; a route: which route, the local confidence per row and which
rows went to the cloud), the data plane stamps the times it measured, and each transport
renders it with :meth:`Provenance.parameters` as the V2 ``parameters`` of its response
(HTTP, gRPC, the sensor bridge's result messages, the cloud worker's replies). The names
and forms of those parameters are a public contract (``docs/api.md``): one field each,
written here only.

Per-row facts (``confidence``, the ``escalated`` mask) are arrays over the answer's rows,
so a transport that answers several readings from one run takes each reading's share with
:meth:`Provenance.rows` rather than re-deriving the route's decision.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np


@dataclass(slots=True)
class Provenance:
    """Where one answer was served, by what, by which route, and how long each part took.

    ``None`` means "not known / not applicable" and is left out of the rendering.
    """

    #: ``edge`` or ``cloud``: where the answer (its escalated rows, for a cascade) came from.
    served_by: str = "edge"
    #: How the router served it: ``local``, ``cloud``, ``escalated``, ``degraded``,
    #: ``overflow`` or ``fallback`` (``None`` until the router or data plane says).
    route: str | None = None
    #: The model and version that answered (the cloud's for a cloud answer).
    model: str | None = None
    model_version: str | None = None
    #: The device's model of a cascade (rendered as ``edge_model`` when only some rows of
    #: the answer were escalated; used to name the local answer of a reading's share).
    edge_model: str | None = None
    edge_version: str | None = None
    #: A cascade's confidence of the local model per row, and its threshold.
    confidence: np.ndarray | None = None
    threshold: float | None = None
    #: Per row: below the threshold, so sent to the cloud (or, ``degraded``, meant to be).
    escalated: np.ndarray | None = None
    #: What failed and was worked around (``fallback``, ``degraded``).
    local_error: str | None = None
    cloud_error: str | None = None
    #: Requests in flight on the local model when ``local-first`` overflowed to the cloud.
    local_queue: int | None = None
    #: A correction result: the route of the answer it corrects (``degraded``).
    corrects: str | None = None
    # ---- times, milliseconds
    #: Device time: the whole request less network and cloud.
    edge_ms: float | None = None
    #: The model's own run time (on the side that rendered the answer).
    compute_ms: float | None = None
    #: Decoding and preprocessing of the input (image pipelines).
    preprocess_ms: float | None = None
    #: Round trip to the cloud less the cloud's own time, and the cloud's time.
    network_ms: float | None = None
    cloud_ms: float | None = None
    #: The cloud worker that answered, and how many tries the uplink needed.
    cloud_worker: str | None = None
    cloud_attempts: int | None = None
    # ---- the cloud worker's own reply
    worker: str | None = None
    execution_provider: str | None = None
    queue_ms: float | None = None
    batch_size: int | None = None

    def parameters(self) -> dict[str, Any]:
        """The V2 response ``parameters`` (the public names and forms)."""
        out: dict[str, Any] = {"served_by": self.served_by}
        if self.route is not None:
            out["route"] = self.route
        if self.model is not None:
            out["model"] = self.model
        if self.model_version is not None:
            out["model_version"] = self.model_version
        mask = self.escalated
        if (
            self.edge_model is not None
            and self.served_by == "cloud"
            and mask is not None
            and not bool(mask.all())
        ):
            out["edge_model"] = self.edge_model
        if self.confidence is not None:
            values = [round(float(c), 4) for c in self.confidence]
            out["confidence"] = values[0] if len(values) == 1 else values
        if self.threshold is not None:
            out["threshold"] = self.threshold
        if mask is not None:
            out["escalated_rows"] = int(np.count_nonzero(mask))
        for key in ("local_error", "cloud_error", "local_queue", "corrects"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        for key in ("network_ms", "cloud_ms", "edge_ms", "compute_ms", "preprocess_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 3)
        if self.cloud_worker:
            out["cloud_worker"] = self.cloud_worker
        if self.cloud_attempts is not None and self.cloud_attempts > 1:
            out["cloud_attempts"] = self.cloud_attempts
        if self.worker is not None:
            out["worker"] = self.worker
        if self.execution_provider is not None:
            out["execution_provider"] = self.execution_provider
        if self.queue_ms is not None:
            out["queue_ms"] = round(self.queue_ms, 3)
        if self.batch_size is not None:
            out["batch_size"] = self.batch_size
        return out

    def rows(self, start: int, stop: int) -> Provenance:
        """The provenance of rows ``[start, stop)`` of the answer (one reading of a batch).

        Per-row facts are cut to those rows. In a cascade, a share none of whose rows was
        below the threshold was answered by the device's model alone: it says so (route
        ``local``, served by the edge, the edge model), whatever its neighbours needed.
        """
        part = replace(
            self,
            confidence=None if self.confidence is None else self.confidence[start:stop],
            escalated=None if self.escalated is None else self.escalated[start:stop],
        )
        if part.escalated is None or part.escalated.any():
            return part
        return replace(
            part,
            served_by="edge",
            route="local",
            model=self.edge_model if self.edge_model is not None else self.model,
            model_version=(
                self.edge_version if self.edge_model is not None else self.model_version
            ),
            escalated=None,
            cloud_error=None,
            network_ms=None,
            cloud_ms=None,
            cloud_worker=None,
            cloud_attempts=None,
        )

    def copy(self) -> Provenance:
        """A shallow copy (per-row arrays are shared; they are never changed in place)."""
        return replace(self)
