"""The data plane: the one place where inference requests are validated, routed and
accounted for. Transports (HTTP, gRPC, the MQTT sensor bridge on the device; the cloud
worker's MQTT transport) only translate bytes to a :class:`~shared.codec.DecodedRequest`
and a :class:`Prediction` back to bytes.

:meth:`DataPlane.infer` answers one request; :meth:`DataPlane.infer_batch` answers several
for one runtime in one run (the cloud worker's dynamic batches). Each side counts what
the data plane reports under its own metric names (:mod:`serving.accounting`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar, cast, overload

import numpy as np

from serving.accounting import Answered, DataPlaneMetrics, ReadinessGauge
from serving.batching import batch_major, batch_rows, split_outputs, stack_requests
from serving.metrics import EdgeMetrics
from serving.repository import ModelRepository
from serving.runtimes import Prediction, Runtime
from shared.codec import DecodedRequest
from shared.datatypes import FLOAT_DATATYPES
from shared.errors import InternalError, InvalidInput, TetherError, Unavailable
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
    #: Where the runtime that answered computes: ``cloud`` for a cloud-only runtime (a
    #: ``cloud`` route, a cascade's late escalation), which says nothing of the device's
    #: own model version.
    served_by: str = "edge"


#: Called after every inference; must be quick (hand real work to a queue).
InferenceObserver = Callable[[Observation], None]


@dataclass(frozen=True)
class Batched:
    """One request's answer from :meth:`DataPlane.infer_batch`, and the run that gave it."""

    prediction: Prediction
    #: Requests and rows of the runtime call that answered it (1 and its own when alone).
    requests: int
    rows: int


M = TypeVar("M", bound=DataPlaneMetrics)


class DataPlane(Generic[M]):
    """Validates, runs and accounts for inference requests; answers health and metadata.

    ``metrics`` is the side's own (:class:`~serving.metrics.EdgeMetrics` by default).
    """

    @overload
    def __init__(
        self: DataPlane[EdgeMetrics],
        repository: ModelRepository,
        metrics: None = None,
        *,
        version: str = "0",
        resolver: Resolver | None = None,
    ) -> None: ...

    @overload
    def __init__(
        self,
        repository: ModelRepository,
        metrics: M,
        *,
        version: str = "0",
        resolver: Resolver | None = None,
    ) -> None: ...

    def __init__(
        self,
        repository: ModelRepository,
        metrics: Any = None,
        *,
        version: str = "0",
        resolver: Resolver | None = None,
    ) -> None:
        self.repository = repository
        self.metrics: M = metrics if metrics is not None else cast(M, EdgeMetrics())
        self.version = version
        #: Routing hook: by default every model is served locally from the repository.
        self.resolve: Resolver = resolver or repository.get
        self.readiness = ReadinessGauge(self.metrics)
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
        try:
            if runtime is None:
                self.repository.sync()
                runtime = self.resolve(name, version)
            check_request(runtime, request)
            prediction = runtime.infer(request.inputs, _wanted(request))
        except TetherError as exc:
            self._failed(name, runtime, request, exc, started)
            raise
        except Exception:
            self._failed(name, runtime, request, InternalError("internal"), started)
            raise
        rows = batch_rows(request.inputs)
        self.metrics.record_run(
            name, prediction.model_version, prediction.compute_ms / 1e3, 1, rows
        )
        return self._answered(name, runtime, request, prediction, rows, started)

    def infer_batch(
        self, runtime: Runtime, requests: Sequence[DecodedRequest]
    ) -> list[Batched | TetherError]:
        """Answer several requests for one runtime, in one run where they allow: each
        request's answer, or the error that failed it, in the order of ``requests``.

        Each request is validated on its own; the valid ones that want the same outputs
        are stacked along the batch dimension and run once, and the outputs are split
        back. One request's bad data costs that request only: when the stacked run fails
        with a client error (an undecodable image), or the model's outputs are not
        batch-major, the requests run one by one.
        """
        started = time.perf_counter()
        name = runtime.name
        answers: list[Batched | TetherError | None] = [None] * len(requests)
        valid: list[int] = []
        for index, request in enumerate(requests):
            try:
                check_request(runtime, request)
            except TetherError as exc:
                answers[index] = self._failed(name, runtime, request, exc, started)
                continue
            valid.append(index)
        wanted = _wanted(requests[valid[0]]) if valid else None
        if any(_wanted(requests[i]) != wanted for i in valid):
            together: list[Batched | TetherError] = []
            for index in valid:
                together += self._run_together(runtime, [requests[index]], started)
        else:
            together = self._run_together(runtime, [requests[i] for i in valid], started)
        for index, answer in zip(valid, together, strict=True):
            answers[index] = answer
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(requests)
        return done

    def _run_together(
        self, runtime: Runtime, requests: Sequence[DecodedRequest], started: float
    ) -> list[Batched | TetherError]:
        """Valid requests that want the same outputs, run in one call (see infer_batch)."""
        if not requests:
            return []
        name = runtime.name
        counts = [batch_rows(r.inputs) for r in requests]
        try:
            stacked = stack_requests(requests) if len(requests) > 1 else requests[0]
            prediction = runtime.infer(stacked.inputs, _wanted(requests[0]))
        except TetherError as exc:
            if exc.status < 500 and len(requests) > 1:
                return self._one_by_one(runtime, requests, started)
            return [self._failed(name, runtime, r, exc, started) for r in requests]
        except Exception as exc:  # a runtime bug is each request's 500
            log.exception("model %s failed", name)
            error = InternalError(f"model {name!r} failed: {type(exc).__name__}")
            return [self._failed(name, runtime, r, error, started) for r in requests]
        rows = sum(counts)
        if len(requests) > 1 and not batch_major(prediction.outputs, rows):
            log.warning("model %s: outputs are not batch-major; running requests one by one", name)
            return self._one_by_one(runtime, requests, started)
        compute_s = prediction.compute_ms / 1e3
        self.metrics.record_run(name, prediction.model_version, compute_s, len(requests), rows)
        if len(requests) == 1:
            parts = [prediction]
        else:
            parts = [
                replace(prediction, outputs=outputs, provenance=prediction.provenance.copy())
                for outputs in split_outputs(prediction.outputs, counts)
            ]
        return [
            Batched(self._answered(name, runtime, r, part, n, started), len(requests), rows)
            for r, part, n in zip(requests, parts, counts, strict=True)
        ]

    def _one_by_one(
        self, runtime: Runtime, requests: Sequence[DecodedRequest], started: float
    ) -> list[Batched | TetherError]:
        return [answer for r in requests for answer in self._run_together(runtime, [r], started)]

    def _answered(
        self,
        name: str,
        runtime: Runtime,
        request: DecodedRequest,
        prediction: Prediction,
        rows: int,
        started: float,
    ) -> Prediction:
        """Count an answered request and stamp its timings and provenance."""
        elapsed = time.perf_counter() - started
        prov = prediction.provenance
        if prov.route is None:
            prov.route = "local"
        route = prov.route
        flops = runtime.flops * rows if runtime.flops else 0
        self.metrics.record_success(
            Answered(
                name,
                prediction.model_version,
                prediction.served_by,
                route,
                elapsed,
                prediction.compute_ms / 1000.0,
                flops,
            )
        )
        # Time on the device itself: all of it, less what the network and the cloud took.
        remote_ms = (prov.network_ms or 0.0) + (prov.cloud_ms or 0.0)
        prov.edge_ms = max(0.0, elapsed * 1000.0 - remote_ms)
        if prov.compute_ms is None:
            prov.compute_ms = prediction.compute_ms
        if self.observers:
            self._observe(name, runtime, request, prediction, None, started)
        return prediction

    def _failed(
        self,
        name: str,
        runtime: Runtime | None,
        request: DecodedRequest,
        error: TetherError,
        started: float,
    ) -> TetherError:
        """Count a failed request (against the version chosen for it) and tell observers."""
        self.metrics.record_failure(name, runtime.version if runtime is not None else None, error)
        if self.observers:
            self._observe(name, runtime, request, None, error, started)
        return error

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
            name,
            version,
            request.inputs,
            prediction,
            error,
            time.perf_counter() - started,
            runtime.served_by if runtime is not None else "edge",
        )
        for observer in self.observers:
            try:
                observer(seen)
            except Exception:  # an observer never fails a request
                log.exception("inference observer failed")

    def resolve_escalation(self, name: str, version: str | None) -> Runtime:
        """The cloud half of ``name``'s route as a runtime for :meth:`infer_batch`: the
        answers its rows would have had when the cloud was away (the sensor bridge's
        corrections), counted as requests of ``name`` served by the cloud."""
        late = self.resolve_for_request(name, version).escalation()
        if late is None:
            raise Unavailable(f"model {name!r} has no cloud route any more")
        return late

    def resolve_for_request(self, name: str, version: str | None) -> Runtime:
        """Apply pending repository orders, then resolve (404/503 before the body is read)."""
        self.repository.sync()
        return self.resolve(name, version)

    def count_failure(self, name: str, exc: TetherError) -> None:
        """Count a failed request (also used by transports for bodies they cannot decode)."""
        self.metrics.record_failure(name, None, exc)

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

    def publish_readiness(self, *others: ModelRepository) -> None:
        """Set the model-ready gauge from what this process serves (its repository, and
        ``others`` it also serves from, such as the cloud worker's text models)."""
        self.readiness.publish([self.repository, *others])


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


def check_request(runtime: Runtime, request: DecodedRequest) -> None:
    """:func:`validate_inputs`, and that every output the request asks for exists."""
    validate_inputs(runtime, request.inputs, request.datatypes)
    if request.outputs:
        known = {spec.name for spec in runtime.outputs}
        for output in request.outputs:
            if output.name not in known:
                raise InvalidInput(f"model {runtime.name!r} has no output {output.name!r}")


def _wanted(request: DecodedRequest) -> list[str] | None:
    """The outputs a request asks for by name (``None``: all of them)."""
    return [o.name for o in request.outputs] if request.outputs else None
