"""The cloud inference worker: MQTT requests in, batched runs on the runtime layer, replies out.

A :class:`CloudWorker` is stateless: it loads its own model repository (the same
:class:`~serving.repository.ModelRepository` and runtimes as the edge), joins the shared
subscription ``$share/<group>/tether/cloud/infer/+/+`` so that every worker of the group
gets a share of the requests, and answers each on the requester's MQTT 5 response topic
with the requester's correlation data, at the QoS the request arrived with (the edge
uplink sends QoS 0: its own deadlines and retries, and this worker's de-duplication, do
what QoS 1 would, without the PUBACKs that stall on a broker with Nagle's algorithm on).

The worker is a transport over the same :class:`~serving.dataplane.DataPlane` as the
device. The MQTT handler (paho's network thread) only decodes the envelope, checks
deadline, duplicate and model, and queues the request; worker threads take batches from
the :class:`~cloud.batcher.DynamicBatcher`, decode the tensors, hand them to
:meth:`~serving.dataplane.DataPlane.infer_batch` (which validates, runs the batch once,
splits it back and counts it in :class:`~cloud.metrics.CloudMetrics`) and publish one
reply per request.

The device id comes from the topic the broker authorised, never from the payload (a
``device`` field there is ignored), and a reply goes only to a response topic inside that
device's own reply namespace (``tether/<device>/cloud/replies/<client>``), so one device
cannot make the worker publish into another's.

Text requests (``/v1`` cloud routes: chat, completions, embeddings) come on the same topics
as a ``text_request`` envelope; the handler checks them the same way and hands them to
:class:`~cloud.text_serving.TextServing`, which streams the answer back in ordered chunks.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass

from cloud.admission import Admitted, DeviceAdmission
from cloud.batcher import Batch, DynamicBatcher, Queued
from cloud.dedupe import Arrival, Key, ReplyAddress, ReplyCache
from cloud.metrics import CloudMetrics, MetricsServer
from cloud.settings import BatchPolicy, CloudSettings
from cloud.text_serving import TextJob, TextServing
from serving.batching import rows_of_shape
from serving.dataplane import Batched, DataPlane
from serving.provenance import Provenance
from serving.repository import ModelRepository
from serving.runtimes import Runtime
from shared import __version__, topics
from shared.codec import DecodedRequest, TensorLimits, build_response, decode_request_parts
from shared.envelopes import (
    ErrorEnvelope,
    InferRequestEnvelope,
    InferResponseEnvelope,
    TextCancelEnvelope,
    TextRequestEnvelope,
    decode_envelope,
    frame,
    request_id_of,
)
from shared.errors import InternalError, InvalidInput, TetherError, Unavailable
from shared.mqtt import Delivery, Message, MqttClient, MqttError
from shared.tracing import bound_request_id

log = logging.getLogger(__name__)

#: Statuses after which a retry of the same request id is run afresh, not deduplicated.
TRANSIENT_STATUSES = frozenset({429, 503})
#: The model label of failures for models this worker does not serve (see ``_model_label``).
UNKNOWN_MODEL = "unknown"


@dataclass
class CloudRequest:
    """A request accepted from MQTT, waiting for or inside a batch."""

    key: Key
    device: str
    envelope: InferRequestEnvelope
    tail: memoryview
    runtime: Runtime
    address: ReplyAddress | None
    #: What it counts against its device's limits until answered (cloud/admission.py).
    admitted: Admitted

    @property
    def request_id(self) -> str:
        return self.envelope.request_id


class CloudWorker:
    """One cloud inference worker process's serving machinery."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        repository: ModelRepository | None = None,
        metrics: CloudMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.repository = repository or ModelRepository(
            settings.repository, settings.runtime_options(), backend=settings.runtime.backend
        )
        self.metrics = metrics or CloudMetrics()
        #: Validates, runs, splits and counts; the worker keeps transport and batching policy.
        self.dataplane = DataPlane(self.repository, self.metrics, version=__version__)
        self.limits = TensorLimits(max_elements=settings.max_tensor_elements)
        self.request_filter = topics.cloud_request_filter(settings.share_group)
        self.batcher: DynamicBatcher[CloudRequest] = DynamicBatcher(
            self._batch_policy, settings.queue_limit
        )
        self.replies = ReplyCache(settings.dedupe_ttl_s, settings.dedupe_max_entries)
        self.admission = DeviceAdmission(settings.admission)
        self.client = MqttClient(settings.mqtt_url, settings.worker_id)
        text_repository = self.repository
        if settings.text_repository is not None:
            text_repository = ModelRepository(
                settings.text_repository,
                settings.runtime_options(),
                backend=settings.runtime.backend,
            )
        self.text = TextServing(
            settings.worker_id,
            text_repository,
            threads=settings.text_threads,
            queue_limit=settings.text_queue_limit,
            metrics=self.metrics,
            replies=self.replies,
            send=self._send,
            release=self.admission.release,
            log_requests=settings.log_requests,
        )
        self._metrics_server: MetricsServer | None = None
        self._threads: list[threading.Thread] = []
        self._policies: dict[str, BatchPolicy] = {}
        self._barrier_topic = topics.cloud_worker_barrier(settings.worker_id)
        self._barriers: dict[bytes, threading.Event] = {}
        self._unanswered: list[Delivery] = []
        self._lock = threading.Lock()
        #: Worker threads running a batch now (an inline run waits for none of them).
        self._busy = 0
        #: Recent compute of one request per model (ms, moving average): inline or not.
        self._compute_ms: dict[str, float] = {}
        self._started = False
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def metrics_port(self) -> int | None:
        """The port the Prometheus endpoint listens on, when it is on."""
        return self._metrics_server.port if self._metrics_server else None

    def start(self) -> None:
        """Load the models, start the threads, connect and subscribe; returns once subscribed."""
        if self._started:
            return
        for name in self.settings.models:
            self.repository.load(name)
        for name in self.settings.text_models:
            self.text.repository.load(name)
        self.dataplane.publish_readiness(self.text.repository)
        for name in self.settings.models:
            self._policies[name] = self._capped_policy(name)
        if self.settings.metrics_port:
            self._metrics_server = MetricsServer(
                self.metrics, self.settings.metrics_host, self.settings.metrics_port
            )
            self._metrics_server.start()
        for index in range(self.settings.worker_threads):
            thread = threading.Thread(target=self._serve, name=f"cloud-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.text.start()
        self._started = True
        try:
            self.client.start(wait_s=self.settings.connect_timeout_s)
            self.client.subscribe(self._barrier_topic, self._on_barrier, qos=1)
            self.client.subscribe(self.request_filter, self._on_request, qos=1)
            self._barrier(self.settings.connect_timeout_s)
        except BaseException:
            self.stop(drain=False)
            raise
        log.info(
            "cloud worker %s ready: models %s, subscribed to %s on %s",
            self.worker_id,
            ", ".join(self.settings.models) or "none",
            self.request_filter,
            self.client.address.url(),
        )

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop taking requests; with ``drain``, answer every accepted request first.

        Draining unsubscribes, waits until the broker has applied that (so every request
        it routed here has arrived), then lets the worker threads finish the queue and
        the running batches and waits until their replies are written (QoS 0) or
        acknowledged (QoS 1), all within
        ``timeout_s`` (default ``drain_timeout_s``). Without ``drain`` queued requests are
        answered 503 at once so the edge can retry them elsewhere.
        """
        if not self._started or self._stopped.is_set():
            return
        self._stopped.set()
        limit = self.settings.drain_timeout_s if timeout_s is None else timeout_s
        until = time.monotonic() + limit
        if self.client.connected:
            self.client.unsubscribe(self.request_filter, keep_handler=True)
            if drain:
                try:
                    self._barrier(max(0.1, min(2.0, until - time.monotonic())))
                except Unavailable as exc:
                    log.warning("drain: %s", exc.message)
        if drain:
            self.batcher.close()
        else:
            for job in self.batcher.discard():
                self._fail(job.item, Unavailable("the cloud worker is stopping"), job.deadline)
        for thread in self._threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))
        self.text.stop(until, drain=drain)
        if any(thread.is_alive() for thread in self._threads):
            log.warning("drain: work still running after %.1fs; leaving it", limit)
        self._wait_published(max(0.5, until - time.monotonic()))
        self.client.stop()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log.info("cloud worker %s stopped", self.worker_id)

    def __enter__(self) -> CloudWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(drain=True)

    # ------------------------------------------------------------------ MQTT side

    def _on_request(self, message: Message) -> None:
        """Decode, dedupe and queue one request (paho's network thread: quick, never raises)."""
        try:
            self._accept(message)
        except Exception:  # a bug must not cost the asker its answer or the loop its life
            log.exception("could not take the request on %s", message.topic)
            error = InternalError("the cloud worker failed to take the request")
            request_id = request_id_of(message.payload) or "unknown"
            self._send(reply_address(message), _error_payload(request_id, error), None)

    def _accept(self, message: Message) -> None:
        arrived = time.monotonic()
        address = reply_address(message)
        if message.response_topic and address is None:
            # A reply there would publish with the worker's rights into a namespace the
            # requester may not write: answer nothing, the request is not the device's.
            self.metrics.failures.labels(UNKNOWN_MODEL, "foreign_reply_topic").inc()
            log.warning(
                "dropped a request on %s: its response topic %r is not the device's own",
                message.topic,
                message.response_topic,
            )
            return
        model = UNKNOWN_MODEL
        try:
            device, model = topics.parse_cloud_request(message.topic)
            envelope, tail = decode_envelope(message.payload)
            if not isinstance(
                envelope, InferRequestEnvelope | TextRequestEnvelope | TextCancelEnvelope
            ):
                raise InvalidInput(f"expected an infer_request envelope, got {envelope.kind!r}")
            if envelope.model != model:
                raise InvalidInput(
                    f"the envelope names model {envelope.model!r} but was sent to {model!r}"
                )
        except TetherError as exc:
            self.metrics.failures.labels(self._model_label(model), exc.reason).inc()
            request_id = request_id_of(message.payload) or "unknown"
            log.info("rejected %s on %s: %s", request_id, message.topic, exc.message)
            self._send(address, _error_payload(request_id, exc), None)
            return
        key = (device, envelope.request_id)
        if isinstance(envelope, TextCancelEnvelope):
            self.text.cancel(key)  # the device's own request only: the key holds its id
            return
        action, cached = self.replies.arrive(key, address)
        if action is not Arrival.NEW:
            self.metrics.duplicates.labels(action.value).inc()
            if action is Arrival.RESEND and cached is not None:
                self._send(address, cached, None)
            return
        deadline = _deadline(envelope, message, arrived)
        if isinstance(envelope, TextRequestEnvelope):
            self._accept_text(
                key, device, envelope, address, len(message.payload), arrived, deadline
            )
            return
        try:
            runtime = self.dataplane.resolve_for_request(model, envelope.version)
            admitted = self.admission.admit(device, len(message.payload))  # 429 past its share
        except TetherError as exc:
            self._fail_unqueued(key, model, envelope.request_id, address, exc)
            return
        request = CloudRequest(key, device, envelope, tail, runtime, address, admitted)
        first = envelope.request.inputs
        rows = rows_of_shape(first[0].shape) if first else 1
        job = Queued(request, model, _batch_key(runtime, envelope), rows, arrived)
        job.deadline = deadline
        self.metrics.inflight.inc()
        if job.expired(arrived):
            self._expire(job)
            return
        if self._inline(model):
            self._run(Batch(jobs=[job], formed=time.monotonic()))
            return
        try:
            self.batcher.put(job)
        except TetherError as exc:
            self._done(request)
            self._fail_unqueued(key, model, envelope.request_id, address, exc)

    def _inline(self, model: str) -> bool:
        """Whether to run a request for ``model`` here, on the network thread: only while
        nothing waits and no worker thread runs (so it delays nobody), for a model whose
        recent compute is short (so the network thread is back at once) and that is not
        batched (a batched model waits for company, as its policy asks). It saves two
        hand-offs between threads, which at low load are most of the worker's latency."""
        limit = self.settings.inline_max_compute_ms
        if limit <= 0 or self._busy or len(self.batcher):
            return False
        if self._batch_policy(model).max_batch_size > 0:
            return False
        return self._compute_ms.get(model, limit) < limit

    def _accept_text(
        self,
        key: Key,
        device: str,
        envelope: TextRequestEnvelope,
        address: ReplyAddress | None,
        size: int,
        arrived: float,
        deadline: float | None,
    ) -> None:
        """Queue a text request for :class:`TextServing` (or answer why it cannot be)."""
        try:
            runtime = self.text.runtime(envelope)
            admitted = self.admission.admit(device, size)
        except TetherError as exc:
            self._fail_unqueued(key, envelope.model, envelope.request_id, address, exc)
            return
        self.metrics.inflight.inc()
        job = TextJob(key, device, envelope, runtime, address, admitted, arrived, deadline)
        try:
            self.text.put(job)
        except TetherError as exc:
            self.metrics.inflight.dec()
            self.admission.release(admitted)
            self._fail_unqueued(key, envelope.model, envelope.request_id, address, exc)

    def _fail_unqueued(
        self,
        key: Key,
        model: str,
        request_id: str,
        address: ReplyAddress | None,
        exc: TetherError,
    ) -> None:
        self.metrics.failures.labels(self._model_label(model), exc.reason).inc()
        payload = _error_payload(request_id, exc)
        if exc.status in TRANSIENT_STATUSES:
            self.replies.forget(key)
            self._send(address, payload, None)
            return
        for target in self.replies.finish(key, payload, address):
            self._send(target, payload, None)

    def _send(self, address: ReplyAddress | None, payload: bytes, deadline: float | None) -> bool:
        """Publish a reply (at the request's QoS), expiring with the request's deadline;
        never raises; False when it could not be handed to the broker connection."""
        if address is None:
            return False
        topic, correlation, qos = address
        expiry = None if deadline is None else max(1.0, deadline - time.monotonic())
        try:
            info = self.client.publish(
                topic, payload, qos=qos, correlation_data=correlation, expiry_s=expiry
            )
        except (MqttError, ValueError) as exc:
            log.warning("could not reply on %s: %s", topic, exc)
            self.metrics.failures.labels(UNKNOWN_MODEL, "reply_failed").inc()
            return False
        with self._lock:
            self._unanswered = [i for i in self._unanswered if not i.is_published()]
            self._unanswered.append(info)
        return True

    def _wait_published(self, timeout_s: float) -> None:
        until = time.monotonic() + timeout_s
        with self._lock:
            pending = list(self._unanswered)
        for info in pending:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(MqttError):
                info.wait_for_publish(remaining)

    def _on_barrier(self, message: Message) -> None:
        event = self._barriers.get(message.payload)
        if event is not None:
            event.set()

    def _barrier(self, timeout_s: float) -> None:
        """Wait until the broker has applied every (un)subscribe sent before this call.

        A broker handles one connection's packets in order, so once a message published
        to our own barrier topic comes back, earlier SUBSCRIBE/UNSUBSCRIBE packets are in
        force, and every request routed to us before them has been received.
        """
        token = secrets.token_hex(8).encode()
        event = threading.Event()
        self._barriers[token] = event
        until = time.monotonic() + timeout_s
        try:
            while not event.is_set():
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise Unavailable(
                        f"the broker did not confirm the subscription in {timeout_s}s"
                    )
                try:
                    self.client.publish(self._barrier_topic, token, qos=1)
                except MqttError:
                    self.client.wait_connected(min(remaining, 0.5))
                    continue
                event.wait(min(remaining, 1.0))
        finally:
            self._barriers.pop(token, None)

    # ------------------------------------------------------------------ worker threads

    def _serve(self) -> None:
        while True:
            batch = self.batcher.take()
            if batch is None:
                return
            try:
                for job in batch.expired:
                    self._expire(job)
                if batch.jobs:
                    with self._lock:
                        self._busy += 1
                    try:
                        self._run(batch)
                    finally:
                        with self._lock:
                            self._busy -= 1
            except Exception:  # a bug must not take a worker thread down
                log.exception("worker thread failed on a batch")

    def _expire(self, job: Queued[CloudRequest]) -> None:
        """Drop a request whose deadline passed: never run, never answered (nobody waits)."""
        request = job.item
        log.info("dropped %s of %s: its deadline passed", request.request_id, request.device)
        self.metrics.failures.labels(job.model, "expired").inc()
        self.replies.finish(request.key, None, None)
        self._done(request)

    def _run(self, batch: Batch[CloudRequest]) -> None:
        """Decode each request, answer the decoded ones through the data plane (validated,
        run in one call where they allow, split back), reply to each."""
        model = batch.jobs[0].model
        runtime = batch.jobs[0].item.runtime
        ready: list[tuple[Queued[CloudRequest], DecodedRequest]] = []
        for job in batch.jobs:
            self.metrics.queue_time.labels(model).observe(batch.formed - job.arrived)
            try:
                decoded = decode_request_parts(  # checked against the model first
                    job.item.envelope.request, job.item.tail, self.limits, runtime
                )
            except TetherError as exc:
                self._finish_error(job, exc)
                continue
            ready.append((job, decoded))
        if not ready:
            return
        answers = self.dataplane.infer_batch(runtime, [decoded for _job, decoded in ready])
        for (job, decoded), answer in zip(ready, answers, strict=True):
            if isinstance(answer, TetherError):
                self._fail(job.item, answer, job.deadline)  # the data plane counted it
                continue
            self._observe_run(model, answer)
            try:
                self._finish_ok(job, decoded, answer, batch.formed)
            except Exception as exc:  # a reply that cannot be built is that request's 500
                log.exception("reply to %s of %s failed", job.item.request_id, job.item.device)
                error = InternalError(f"the cloud worker could not reply: {type(exc).__name__}")
                self._finish_error(job, error)

    def _observe_run(self, model: str, answer: Batched) -> None:
        """Keep the recent compute of one request alone: it decides whether one may run inline."""
        if answer.requests == 1:
            compute_ms = answer.prediction.compute_ms
            last = self._compute_ms.get(model, compute_ms)
            self._compute_ms[model] = 0.8 * last + 0.2 * compute_ms

    def _finish_ok(
        self,
        job: Queued[CloudRequest],
        decoded: DecodedRequest,
        answer: Batched,
        formed: float,
    ) -> None:
        request = job.item
        runtime = request.runtime
        prediction = answer.prediction
        rows = answer.rows
        queue_ms = round((formed - job.arrived) * 1000.0, 3)
        compute_ms = round(prediction.compute_ms, 3)
        header, blobs = build_response(
            model_name=prediction.model_name,
            model_version=prediction.model_version,
            outputs=prediction.outputs,
            datatypes={spec.name: spec.datatype for spec in runtime.outputs},
            request_id=decoded.id,
            parameters=Provenance(
                served_by="cloud",
                worker=self.worker_id,
                execution_provider=runtime.provider,
                queue_ms=queue_ms,
                compute_ms=compute_ms,
                batch_size=rows,
            ).parameters(),
            requested=decoded.outputs,
            binary_default=decoded.binary_output_default,
        )
        envelope = InferResponseEnvelope(
            request_id=request.request_id,
            worker=self.worker_id,
            queue_ms=queue_ms,
            compute_ms=compute_ms,
            batch_size=rows,
            worker_version=__version__,
            response=header,
        )
        payload = frame(envelope.dump(), blobs)
        if self.settings.log_requests:
            with bound_request_id(request.envelope.trace_id or request.request_id):
                log.info(
                    "served %s v%s for device %s: queue %.3f ms, compute %.3f ms, batch %d",
                    job.model,
                    prediction.model_version,
                    request.device,
                    queue_ms,
                    compute_ms,
                    rows,
                )
        self._answer(job, payload)

    def _finish_error(self, job: Queued[CloudRequest], exc: TetherError) -> None:
        self.dataplane.count_failure(job.model, exc)
        self._fail(job.item, exc, job.deadline)

    def _fail(self, request: CloudRequest, exc: TetherError, deadline: float | None) -> None:
        payload = _error_payload(request.request_id, exc)
        # Released before the reply leaves: a device that has its answer may ask again at
        # once without meeting its own finished request in its share.
        self._done(request)
        if exc.status in TRANSIENT_STATUSES:
            self.replies.forget(request.key)
            self._send(request.address, payload, deadline)
        else:
            for target in self.replies.finish(request.key, payload, request.address):
                self._send(target, payload, deadline)

    def _answer(self, job: Queued[CloudRequest], payload: bytes) -> None:
        self._done(job.item)  # released before the reply leaves (see _fail)
        for target in self.replies.finish(job.item.key, payload, job.item.address):
            self._send(target, payload, job.deadline)

    def _done(self, request: CloudRequest) -> None:
        """The request no longer occupies this worker (answered, failed or dropped)."""
        self.metrics.inflight.dec()
        self.admission.release(request.admitted)

    # ------------------------------------------------------------------ models

    def _batch_policy(self, model: str) -> BatchPolicy:
        policy = self._policies.get(model)
        if policy is None:
            policy = self._policies[model] = self._capped_policy(model)
        return policy

    def _capped_policy(self, model: str) -> BatchPolicy:
        """The configured policy, capped by the model's own ``max_batch_size`` when it has one."""
        policy = self.settings.batching.for_model(model)
        try:
            runtime = self.repository.get(model)
        except TetherError:
            return policy
        if runtime.max_batch_size and policy.max_batch_size > runtime.max_batch_size:
            return BatchPolicy(
                max_batch_size=runtime.max_batch_size, max_queue_delay_ms=policy.max_queue_delay_ms
            )
        return policy

    def _model_label(self, name: str) -> str:
        """``name`` as a metric label: a model this worker serves, else ``"unknown"``.

        Model names come from request topics, which any device can make up; labelling
        metrics with them would let one device grow the worker's label sets without bound.
        """
        if name in self.repository.served() or name in self.text.repository.served():
            return name
        return UNKNOWN_MODEL


# ---------------------------------------------------------------------- request facts


def reply_address(message: Message) -> ReplyAddress | None:
    """Where a request may be answered: its response topic, only when that topic is in the
    reply namespace of the device the request topic names (the one the broker authorised).
    """
    if not message.response_topic:
        return None
    try:
        device, _model = topics.parse_cloud_request(message.topic)
        owner, _client = topics.parse_cloud_replies(message.response_topic)
    except TetherError:
        return None
    if owner != device:
        return None
    return ReplyAddress(message.response_topic, message.correlation_data, min(message.qos, 1))


def _deadline(
    envelope: InferRequestEnvelope | TextRequestEnvelope, message: Message, arrived: float
) -> float | None:
    """The monotonic deadline: the envelope's (Unix time), or the MQTT expiry if sooner."""
    candidates: list[float] = []
    if envelope.deadline is not None:
        candidates.append(arrived + (envelope.deadline - time.time()))
    if message.expiry_s is not None:
        candidates.append(arrived + message.expiry_s)
    return min(candidates) if candidates else None


def _batch_key(runtime: Runtime, envelope: InferRequestEnvelope) -> Hashable | None:
    """What must match for two requests to share one run; ``None`` when it cannot batch."""
    if not runtime.inputs or any(not s.shape or s.shape[0] != -1 for s in runtime.inputs):
        return None
    request = envelope.request
    if any(not spec.shape for spec in request.inputs):
        return None
    inputs = tuple(
        sorted((spec.name, spec.datatype, tuple(spec.shape[1:])) for spec in request.inputs)
    )
    outputs = tuple(o.name for o in request.outputs) if request.outputs else None
    return (runtime, inputs, outputs)


def _error_payload(request_id: str, exc: TetherError) -> bytes:
    return frame(ErrorEnvelope.from_error(request_id, exc).dump())
