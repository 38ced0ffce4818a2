"""The data plane: the one place where inference requests are validated, routed and
accounted for. Transports (the Flask API, the MQTT sensor bridge) only translate bytes
to a :class:`~shared.codec.DecodedRequest` and a :class:`Prediction` back to bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from serving.runtimes import Prediction, Runtime
from shared.codec import DecodedRequest
from shared.datatypes import FLOAT_DATATYPES
from shared.errors import InternalError, InvalidInput, TetherError
from shared.signature import check_inputs

log = logging.getLogger(__name__)

SERVER_NAME = "tether"

#: Protocol extensions this server implements (reported by ``GET /v2``).
EXTENSIONS = ["binary_tensor_data", "model_repository"]

#: Resolves a model name (and optional version) to the runtime that will answer it.
Resolver = Callable[[str, "str | None"], Runtime]


@dataclass(frozen=True)
class Observation:
    """One finished inference, as observers see it (per-version health, shadow traffic)."""

    model: str
    #: The version of the runtime that answered (``None`` if none was resolved).
    version: str | None
    inputs: Mapping[str, np.ndarray]
    prediction: Prediction | None
    error: TetherError | None
    seconds: float


#: Called after every inference; must be quick (hand real work to a queue).
InferenceObserver = Callable[[Observation], None]


class DataPlane:
    """Validates, runs and accounts for inference requests; answers health and metadata."""

    def __init__(
        self,
        repository: ModelRepository,
        metrics: EdgeMetrics | None = None,
        *,
        version: str = "0",
        resolver: Resolver | None = None,
    ) -> None:
        self.repository = repository
        self.metrics = metrics or EdgeMetrics()
        self.version = version
        #: Routing hook: by default every model is served locally from the repository.
        self.resolve: Resolver = resolver or repository.get
        self._published: dict[tuple[str, str], str] = {}
        #: Hooks that see each inference after it ran (see :class:`Observation`).
        self.observers: list[InferenceObserver] = []

    # ------------------------------------------------------------------ health & metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        self.repository.sync()
        return self.repository.all_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        self.repository.sync()
        return self.resolve(name, version).metadata()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        self.repository.sync()
        try:
            return self.resolve(name, version).ready
        except TetherError as exc:
            if exc.status == 404:
                raise
            return False

    # ------------------------------------------------------------------ inference

    def infer(
        self,
        name: str,
        version: str | None,
        request: DecodedRequest,
        started: float | None = None,
        runtime: Runtime | None = None,
    ) -> Prediction:
        """Validate ``request`` against the model, run it, record metrics.

        ``runtime`` is the already resolved runtime, when the transport resolved it first.
        """
        started = time.perf_counter() if started is None else started
        metrics = self.metrics
        try:
            if runtime is None:
                self.repository.sync()
                runtime = self.resolve(name, version)
            validate_inputs(runtime, request.inputs, request.datatypes)
            wanted = [o.name for o in request.outputs] if request.outputs else None
            if wanted:
                known = {spec.name for spec in runtime.outputs}
                unknown = [n for n in wanted if n not in known]
                if unknown:
                    raise InvalidInput(f"model {name!r} has no output {unknown[0]!r}")
            prediction = runtime.infer(request.inputs, wanted)
        except TetherError as exc:
            self.count_failure(name, exc)
            if runtime is not None and exc.status >= 500:
                metrics.version_errors.labels(name, runtime.version).inc()
            if self.observers:
                self._observe(name, runtime, request, None, exc, started)
            raise
        except Exception:
            metrics.failures.labels(name, "internal").inc()
            if runtime is not None:
                metrics.version_errors.labels(name, runtime.version).inc()
            if self.observers:
                self._observe(name, runtime, request, None, InternalError("internal"), started)
            raise
        elapsed = time.perf_counter() - started
        route = str(prediction.parameters.get("route", "local"))
        flops = runtime.flops * _batch_size(request.inputs) if runtime.flops else 0
        metrics.record_success(
            name,
            prediction.model_version,
            prediction.served_by,
            route,
            elapsed,
            prediction.compute_ms / 1000.0,
            flops,
        )
        params = prediction.parameters
        params.setdefault("served_by", prediction.served_by)
        params.setdefault("route", route)
        # Time on the device itself: all of it, less what the network and the cloud took.
        remote_ms = params.get("network_ms", 0.0) + params.get("cloud_ms", 0.0)
        params["edge_ms"] = round(max(0.0, elapsed * 1000.0 - remote_ms), 3)
        params.setdefault("compute_ms", round(prediction.compute_ms, 3))
        if self.observers:
            self._observe(name, runtime, request, prediction, None, started)
        return prediction

    def _observe(
        self,
        name: str,
        runtime: Runtime | None,
        request: DecodedRequest,
        prediction: Prediction | None,
        error: TetherError | None,
        started: float,
    ) -> None:
        version = runtime.version if runtime is not None else None
        seen = Observation(
            name, version, request.inputs, prediction, error, time.perf_counter() - started
        )
        for observer in self.observers:
            try:
                observer(seen)
            except Exception:  # an observer never fails a request
                log.exception("inference observer failed")

    def resolve_for_request(self, name: str, version: str | None) -> Runtime:
        """Apply pending repository orders, then resolve (404/503 before the body is read)."""
        self.repository.sync()
        return self.resolve(name, version)

    def count_failure(self, name: str, exc: TetherError) -> None:
        """Count a failed request (also used by transports for bodies they cannot decode)."""
        self.metrics.failures.labels(name, exc.reason).inc()

    # ------------------------------------------------------------------ repository

    def repository_index(self) -> list[dict[str, Any]]:
        self.repository.sync()
        return [entry.model_dump(exclude_none=True) for entry in self.repository.index()]

    def load_model(self, name: str) -> None:
        self.repository.load(name)
        self.publish_readiness()

    def unload_model(self, name: str) -> None:
        self.repository.unload(name)
        self.publish_readiness()

    def publish_readiness(self) -> None:
        """Set the ``tether_model_ready`` gauge from what this process serves."""
        current: dict[tuple[str, str], str] = {}
        for name, versions in self.repository.served().items():
            for version, runtime in versions.items():
                current[(name, version)] = runtime.provider
                self.metrics.model_ready.labels(name, version, runtime.provider).set(
                    1 if runtime.ready else 0
                )
        for (name, version), provider in self._published.items():
            if (name, version) not in current:
                self.metrics.model_ready.labels(name, version, provider).set(0)
        self._published = current


def _batch_size(inputs: Mapping[str, np.ndarray]) -> int:
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


def validate_inputs(
    runtime: Runtime, inputs: Mapping[str, np.ndarray], datatypes: Mapping[str, str]
) -> None:
    """Check names, datatypes, shapes, batch size and finiteness against the model (the
    codec checked what the request declared before decoding; this checks what it holds)."""
    check_inputs(runtime, datatypes, {name: array.shape for name, array in inputs.items()})
    for spec in runtime.inputs:
        array = inputs[spec.name]
        if spec.datatype in FLOAT_DATATYPES and not np.isfinite(array).all():
            raise InvalidInput(
                f"input {spec.name!r} contains NaN or infinite values, which model "
                f"{runtime.name!r} cannot take"
            )
