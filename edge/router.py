"""The router: resolves a model name to the runtime that answers it, by the name's route.

Routes (``[routes.<name>]`` in the agent's config; a name without one is ``local``):

* ``local`` — the device's model only;
* ``cloud`` — always the cloud (a model too large for the device);
* ``cascade`` — the device's small model; rows whose confidence is below the threshold go
  to the cloud's large model; if the cloud fails, the local answer is returned marked
  ``degraded``;
* ``local-first`` — the device, and the cloud when the local model fails or has more than
  ``max_queue`` requests in flight;
* ``cloud-first`` — the cloud, and the device when the cloud is unreachable or too slow.

Every route is a :class:`~serving.runtimes.Runtime`, so the data plane validates and accounts
for it like any model; its :class:`Prediction` says where it was served (``served_by``),
by which model and version, by which route, with the local confidence where there was one
and the time spent on the edge, on the network and in the cloud.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge.route_modes import ROUTE_MODES
from edge.settings import RouteSettings
from edge.uplink import CloudRuntime, Uplink
from serving.batching import batch_rows
from serving.confidence import confidence
from serving.metrics import EdgeMetrics
from serving.model_config import load_model_config
from serving.repository import ModelRepository
from serving.runtimes.base import ComposedRuntime, Prediction, Runtime, TensorSpec, model_flops
from shared.datatypes import from_numpy_dtype
from shared.errors import InternalError, InvalidInput, TetherError, Unavailable

log = logging.getLogger(__name__)


class InflightCounter:
    """Requests in flight per local model version (what ``local-first`` compares)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def current(self, runtime: Runtime) -> int:
        return self._counts.get((runtime.name, runtime.version), 0)

    def enter(self, runtime: Runtime) -> tuple[str, str]:
        """Count a request into ``runtime``; pass the returned key to :meth:`leave`."""
        key = (runtime.name, runtime.version)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1
        return key

    def leave(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._counts[key] -= 1


class Accounting:
    """Records what composite routes spend: FLOPs on each side and cascade outcomes."""

    def __init__(self, metrics: EdgeMetrics | None) -> None:
        self.metrics = metrics

    def flops(self, runtime: Runtime, inputs: Mapping[str, np.ndarray], served_by: str) -> None:
        """Count ``runtime``'s FLOPs for the rows of ``inputs`` (nothing without metrics)."""
        if self.metrics is not None and runtime.flops and (rows := batch_rows(inputs)):
            self.metrics.inference_flops.labels(served_by).inc(runtime.flops * rows)

    def rows(self, route: str, outcome: str, count: int) -> None:
        if self.metrics is not None and count:
            self.metrics.escalations.labels(route, outcome).inc(count)


class RouteRuntime(ComposedRuntime):
    """Base of the composite routes: metadata of the local model, no loading of its own."""

    platform = "tether_route"
    mode = "route"

    def __init__(
        self,
        name: str,
        local: Runtime,
        cloud: CloudRuntime | None,
        *,
        inflight: InflightCounter,
        accounting: Accounting,
    ) -> None:
        super().__init__(name, local.version)
        self.local = local
        self.cloud = cloud
        self.inflight = inflight
        self.accounting = accounting
        self.inputs = list(local.inputs)
        self.outputs = list(local.outputs)
        self.max_batch_size = local.max_batch_size
        self.provider = local.provider
        #: FLOPs are recorded by the route itself, per side (see :class:`Accounting`).
        self.flops = None
        self._late: LateEscalation | None = None

    @classmethod
    def build(
        cls,
        name: str,
        local: Runtime,
        cloud: CloudRuntime | None,
        route: RouteSettings | None,
        *,
        inflight: InflightCounter,
        accounting: Accounting,
    ) -> RouteRuntime:
        """The route for ``name`` as its settings ask (``route`` is ``None`` for a model
        without a route, which is served locally)."""
        options = cls.options(route) if route is not None else {}
        return cls(name, local, cloud, inflight=inflight, accounting=accounting, **options)

    @classmethod
    def options(cls, route: RouteSettings) -> dict[str, Any]:
        """The mode's own settings, as keyword arguments of the constructor."""
        return {}

    @property
    def ready(self) -> bool:
        return self.local.ready

    def escalation(self) -> Runtime | None:
        """The cloud half of the route, for answers the cloud could not give at the time
        (``degraded`` ones): see :class:`LateEscalation`."""
        if self.cloud is None:
            return None
        if self._late is None:
            self._late = LateEscalation(self, self.cloud)
        return self._late

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["parameters"].update(
            route=self.mode,
            local_model=self.local.name,
            cloud_model=self.cloud.cloud_model if self.cloud else None,
            flops=self.local.flops,
            cloud_flops=self.cloud.flops if self.cloud else None,
        )
        return meta

    # helpers shared by the routes

    def _run_local(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None
    ) -> Prediction:
        key = self.inflight.enter(self.local)
        try:
            prediction = self.local.infer(inputs, output_names)
        finally:
            self.inflight.leave(key)
        self.accounting.flops(self.local, inputs, "edge")
        return prediction

    def _run_cloud(
        self,
        inputs: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None,
        via: Runtime | None = None,
    ) -> Prediction:
        """The cloud's answer; ``via`` the local model, which chooses the form of an escalation."""
        if self.cloud is None:
            raise Unavailable(f"route {self.name!r} has no uplink to the cloud")
        if via is not None:
            prediction = via.escalate(self.cloud, inputs, output_names)
        else:
            prediction = self.cloud.infer(inputs, output_names)
        self.accounting.flops(self.cloud, inputs, "cloud")
        return prediction


class LateEscalation(ComposedRuntime):
    """A route's cloud half as a runtime of its own: what the cloud answers, now, for
    inputs the device answered alone because the cloud was away. Sent the way the route
    sends escalations (through the local model, which picks the smallest form); the
    answer is route ``escalated`` and says it ``corrects`` a ``degraded`` one."""

    platform = "tether_route"
    served_by = "cloud"

    def __init__(self, route: RouteRuntime, cloud: CloudRuntime) -> None:
        super().__init__(route.name, route.version)
        self.route = route
        self.inputs = list(route.inputs)
        self.outputs = list(route.outputs)
        self.max_batch_size = cloud.max_batch_size
        self.provider = "cloud"

    @property
    def ready(self) -> bool:
        return self.route.cloud is not None and self.route.cloud.ready

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        prediction = self.route._run_cloud(inputs, output_names, via=self.route.local)
        prediction.provenance.route, prediction.provenance.corrects = "escalated", "degraded"
        return prediction


class LocalRoute(RouteRuntime):
    """``local``: the device's model, with provenance; counts requests in flight."""

    mode = "local"

    def __init__(
        self,
        name: str,
        local: Runtime,
        cloud: CloudRuntime | None = None,
        *,
        inflight: InflightCounter,
        accounting: Accounting | None = None,
    ) -> None:
        super().__init__(name, local, None, inflight=inflight, accounting=Accounting(None))
        self.flops = local.flops  # one side only: the data plane counts it

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        return _local_answer(self._run_local(inputs, output_names), "local")


class CascadeRoute(RouteRuntime):
    """``cascade``: the small local model; low-confidence rows escalate to the cloud."""

    mode = "cascade"

    def __init__(
        self,
        name: str,
        local: Runtime,
        cloud: CloudRuntime | None,
        *,
        measure: str,
        threshold: float,
        confidence_output: str | None,
        inflight: InflightCounter,
        accounting: Accounting,
    ) -> None:
        super().__init__(name, local, cloud, inflight=inflight, accounting=accounting)
        self.measure = measure
        self.threshold = threshold
        self.confidence_output = confidence_output or (
            local.outputs[0].name if local.outputs else ""
        )

    @classmethod
    def options(cls, route: RouteSettings) -> dict[str, Any]:
        return {
            "measure": route.confidence,
            "threshold": route.threshold,
            "confidence_output": route.confidence_output,
        }

    def metadata(self) -> dict[str, Any]:
        meta = super().metadata()
        meta["parameters"].update(confidence=self.measure, threshold=self.threshold)
        return meta

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        wanted = list(output_names) if output_names else [s.name for s in self.local.outputs]
        local = self._run_local(inputs, None)
        scores = local.outputs.get(self.confidence_output)
        if scores is None:
            raise InvalidInput(
                f"cascade {self.name!r}: model {self.local.name!r} has no output "
                f"{self.confidence_output!r} to measure confidence on"
            )
        conf = confidence(scores, self.measure)
        below = conf < self.threshold
        low = np.flatnonzero(below)
        outputs = {name: local.outputs[name] for name in wanted}
        total = len(conf)
        if low.size == 0:
            self.accounting.rows(self.name, "local", total)
            answer = _local_answer(local, "local", outputs)
            answer.provenance.confidence, answer.provenance.threshold = conf, self.threshold
            return answer
        sub = {key: np.ascontiguousarray(value[low]) for key, value in inputs.items()}
        try:
            remote = self._run_cloud(sub, wanted, via=self.local)
        except TetherError as exc:
            log.info("cascade %s: cloud failed, answering locally: %s", self.name, exc.message)
            self.accounting.rows(self.name, "local", total - low.size)
            self.accounting.rows(self.name, "degraded", low.size)
            answer = _local_answer(local, "degraded", outputs)
            prov = answer.provenance
            prov.confidence, prov.threshold, prov.escalated = conf, self.threshold, below
            prov.cloud_error = exc.message
            return answer
        self.accounting.rows(self.name, "local", total - low.size)
        self.accounting.rows(self.name, "escalated", low.size)
        merged = _merge_rows(outputs, remote.outputs, low, total)
        prov = remote.provenance
        prov.route, prov.confidence, prov.threshold, prov.escalated = (
            "escalated", conf, self.threshold, below,
        )  # fmt: skip
        prov.edge_model, prov.edge_version = local.model_name, local.model_version
        return Prediction(
            outputs=merged,
            model_name=remote.model_name,
            model_version=remote.model_version,
            compute_ms=local.compute_ms + remote.compute_ms,
            provenance=prov,
        )


class LocalFirstRoute(RouteRuntime):
    """``local-first``: the device; the cloud when the device fails or is over its queue."""

    mode = "local-first"

    def __init__(
        self,
        name: str,
        local: Runtime,
        cloud: CloudRuntime | None,
        *,
        max_queue: int,
        inflight: InflightCounter,
        accounting: Accounting,
    ) -> None:
        super().__init__(name, local, cloud, inflight=inflight, accounting=accounting)
        self.max_queue = max_queue

    @classmethod
    def options(cls, route: RouteSettings) -> dict[str, Any]:
        return {"max_queue": route.max_queue}

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        queued = self.inflight.current(self.local)
        if queued >= self.max_queue:
            try:
                remote = self._run_cloud(inputs, output_names)
            except TetherError as exc:
                log.debug("local-first %s: queue full and cloud failed (%s)", self.name, exc)
            else:
                remote.provenance.route, remote.provenance.local_queue = "overflow", queued
                return remote
        try:
            local = self._run_local(inputs, output_names)
        except TetherError as exc:
            if exc.status < 500:
                raise
            local_error: Exception = exc
        except Exception as exc:
            local_error = exc
        else:
            return _local_answer(local, "local")
        try:
            remote = self._run_cloud(inputs, output_names)
        except TetherError as exc:
            raise Unavailable(
                f"model {self.local.name!r} failed locally ({_describe(local_error)}) and in "
                f"the cloud ({exc.message})"
            ) from exc
        remote.provenance.route = "fallback"
        remote.provenance.local_error = _describe(local_error)
        return remote


class CloudFirstRoute(RouteRuntime):
    """``cloud-first``: the cloud; the device when the cloud is unreachable or too slow."""

    mode = "cloud-first"

    @property
    def ready(self) -> bool:
        return self.local.ready or (self.cloud is not None and self.cloud.ready)

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        try:
            remote = self._run_cloud(inputs, output_names)
        except TetherError as exc:
            if exc.status < 500:
                raise
            local = self._run_local(inputs, output_names)
            answer = _local_answer(local, "degraded")
            answer.provenance.cloud_error = exc.message
            return answer
        remote.provenance.route = "cloud"
        return remote


#: The route class of each mode that needs a local model (``cloud`` answers with the
#: uplink's :class:`CloudRuntime` itself); one per mode of :data:`ROUTE_MODES`.
ROUTE_CLASSES: dict[str, type[RouteRuntime]] = {
    cls.mode: cls for cls in (LocalRoute, CascadeRoute, LocalFirstRoute, CloudFirstRoute)
}
assert set(ROUTE_CLASSES) == {m.name for m in ROUTE_MODES.values() if m.needs_local}


class Router:
    """Resolves model names to runtimes according to their routes (the data plane's hook)."""

    def __init__(
        self,
        repository: ModelRepository,
        routes: Mapping[str, RouteSettings] | None = None,
        uplink: Uplink | None = None,
        *,
        metrics: EdgeMetrics | None = None,
        price_per_1000: float = 0.0,
    ) -> None:
        self.repository = repository
        self.routes = dict(routes or {})
        self.uplink = uplink
        self.metrics = metrics
        self.price_per_request = price_per_1000 / 1000.0
        self.inflight = InflightCounter()
        self.accounting = Accounting(metrics)
        self._clouds: dict[tuple[str, str | None], CloudRuntime] = {}
        self._routes: dict[tuple[str, str | None], RouteRuntime] = {}
        self._lock = threading.Lock()

    def resolve(self, name: str, version: str | None = None) -> Runtime:
        """The runtime answering ``name`` (``version`` picks the local or cloud version).

        Route wrappers are cached per (name, version) and rebuilt only when the repository
        has switched the local runtime underneath (this runs twice on every request).
        """
        route = self.routes.get(name)
        if route is not None and not ROUTE_MODES[route.mode].needs_local:
            return self._cloud(name, route, version)
        local_name = (route.local_model or name) if route else name
        local = self.repository.get(local_name, version)
        key = (name, version)
        cached = self._routes.get(key)
        if cached is not None and cached.local is local:
            return cached
        wrapper = self._build(name, route, version, local)
        self._routes[key] = wrapper
        return wrapper

    def _build(
        self, name: str, route: RouteSettings | None, version: str | None, local: Runtime
    ) -> RouteRuntime:
        mode = route.mode if route is not None else "local"
        cloud = None
        if route is not None and ROUTE_MODES[mode].needs_cloud:
            cloud = self._cloud(name, route, None, local)
        return ROUTE_CLASSES[mode].build(
            name, local, cloud, route, inflight=self.inflight, accounting=self.accounting
        )

    def _cloud(
        self,
        name: str,
        route: RouteSettings,
        version: str | None,
        local: Runtime | None = None,
    ) -> CloudRuntime:
        if self.uplink is None:
            raise Unavailable(f"model {name!r} is routed to the cloud but the uplink is off")
        key = (name, version)
        cached = self._clouds.get(key)
        if cached is not None:
            return cached
        cloud_model = route.cloud_model or name
        inputs, outputs, flops, max_batch = self._cloud_metadata(route, cloud_model, local)
        if not inputs:
            raise Unavailable(
                f"route {name!r}: the inputs of cloud model {cloud_model!r} are unknown; "
                "declare them in the route (inputs = [...]) or put its files in the repository"
            )
        runtime = CloudRuntime(
            name,
            self.uplink,
            cloud_model=cloud_model,
            cloud_version=version or route.cloud_version,
            inputs=inputs,
            outputs=outputs,
            flops=flops,
            max_batch_size=max_batch,
            timeout_s=route.timeout_s,
            price_per_request=self.price_per_request,
            metrics=self.metrics,
        )
        runtime.load()
        with self._lock:
            self._clouds[key] = runtime
        return runtime

    def _cloud_metadata(
        self, route: RouteSettings, cloud_model: str, local: Runtime | None
    ) -> tuple[list[TensorSpec], list[TensorSpec], int | None, int]:
        """Declared metadata, else the model's files in the repository, else the local model's."""
        declared_in = [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in route.inputs or ()]
        declared_out = [TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in route.outputs or ()]
        on_disk = read_model_metadata(self.repository.root / cloud_model)
        if on_disk is not None:
            inputs, outputs, flops, max_batch = on_disk
            return declared_in or inputs, declared_out or outputs, flops, max_batch
        if local is not None:
            return (
                declared_in or list(local.inputs),
                declared_out or list(local.outputs),
                None,
                local.max_batch_size,
            )
        return declared_in, declared_out, None, 0


def read_model_metadata(
    model_dir: Path,
) -> tuple[list[TensorSpec], list[TensorSpec], int | None, int] | None:
    """A repository model's inputs, outputs, FLOPs and max batch, read without loading it.

    The config's declared tensors win; the rest comes from the ONNX graph of the latest
    version. ``None`` when the model is not in the repository.
    """
    if not model_dir.is_dir():
        return None
    versions = sorted(int(d.name) for d in model_dir.iterdir() if d.is_dir() and d.name.isdigit())
    if not versions:
        return None
    try:
        config = load_model_config(model_dir)
    except TetherError as exc:
        log.warning("cannot read %s: %s", model_dir, exc.message)
        return None
    path = model_dir / str(versions[-1]) / config.model_filename
    declared_in = [
        TensorSpec(t.name, t.datatype, tuple(config.input_shape(t))) for t in config.client_inputs()
    ]
    declared_out = [
        TensorSpec(t.name, t.datatype, tuple(config.input_shape(t)))
        for t in config.client_outputs()
    ]
    graph_in: list[TensorSpec] = []
    graph_out: list[TensorSpec] = []
    is_onnx = path.suffix == ".onnx" and path.is_file()
    if is_onnx and not (declared_in and declared_out):  # the graph only where the config is silent
        graph_in, graph_out = _onnx_specs(path)
    flops = model_flops(path, config.parameters.get("flops")) if is_onnx else None
    return (declared_in or graph_in, declared_out or graph_out, flops, config.max_batch_size)


def _onnx_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
            for d in tensor.shape.dim
        )
        return TensorSpec(value.name, from_numpy_dtype(dtype), shape)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


# ---------------------------------------------------------------------- helpers


def _local_answer(
    prediction: Prediction, route: str, outputs: dict[str, np.ndarray] | None = None
) -> Prediction:
    prov = prediction.provenance
    prov.served_by, prov.route = "edge", route
    prov.model, prov.model_version = prediction.model_name, prediction.model_version
    if outputs is not None:
        prediction.outputs = outputs
    return prediction


def _merge_rows(
    local: Mapping[str, np.ndarray],
    remote: Mapping[str, np.ndarray],
    rows: np.ndarray,
    total: int,
) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    for name, array in local.items():
        answer = remote.get(name)
        if answer is None:
            raise InternalError(f"the cloud model gave no output {name!r}")
        if rows.size == total and answer.shape[0] == total:
            merged[name] = answer
            continue
        out = np.array(array, copy=True)
        if answer.shape[1:] != out.shape[1:] or answer.shape[0] != rows.size:
            raise InvalidInput(
                f"cloud output {name!r} has shape {list(answer.shape)}, the local one "
                f"{list(out.shape)}: a cascade needs models with the same outputs"
            )
        out[rows] = answer.astype(out.dtype, copy=False)
        merged[name] = out
    return merged


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, TetherError) else f"{type(exc).__name__}: {exc}"
