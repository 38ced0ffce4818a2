"""The uplink: the agent's MQTT request/response client to the cloud inference service.

One :class:`Uplink` per worker process owns one :class:`~shared.mqtt.MqttClient` (paho
stays inside that adapter). A request is an :class:`InferRequestEnvelope` published with
QoS 0 to ``tether/cloud/infer/<device>/<model>``, carrying an MQTT 5 response topic (this
connection's reply topic), correlation data (the request id) and a message expiry equal to
what is left of the request's deadline, so the broker drops a request nobody waits for.
The worker answers at QoS 0 too.

Why QoS 0: QoS 1 would add nothing that the uplink does not already do better (it
retries within the request's own deadline, and the cloud worker runs a retried request
once and re-sends its answer), and its PUBACKs cost ~40 ms per round trip on a broker that
leaves Nagle's algorithm on (a stock Mosquitto): the broker's PUBACK to us waits for our
delayed ACK, and the reply behind it waits too (docs/troubleshooting.md).

Replies resolve futures keyed by correlation id. A reply that does not come within
``attempt_timeout_s`` (a lost message, a cloud worker killed mid-request) makes the
request go out again while its deadline allows; past the deadline the caller gets
:class:`DeadlineExceeded`, never a hang. When the broker is down, publishing fails at once and requests in flight
fail at once. A :class:`~edge.breaker.CircuitBreaker` turns a cloud that keeps timing out
into immediate 503s until a trial call succeeds.

Once connected, the uplink measures the broker in the background
(:func:`~edge.broker_check.check_broker`): the round trips go into ``/metrics`` for
``tether status``, and a broker that stalls QoS 1 answers gets a warning in the log.

:class:`CloudRuntime` puts the uplink behind the runtime interface, so the router chooses
between a local model and the cloud as between two runtimes. Text requests (``/v1`` cloud
routes) share this connection through :meth:`Uplink.listen` (edge/text_uplink.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge.breaker import BreakerState, CircuitBreaker
from edge.broker_check import check_broker
from edge.settings import UplinkSettings
from serving.metrics import EdgeMetrics
from serving.provenance import Provenance
from serving.runtimes.base import ComposedRuntime, Prediction, TensorSpec
from shared import __version__, topics
from shared.client_ids import random_client_id
from shared.codec import OutputRequest, build_request, decode_response_parts
from shared.envelopes import (
    ErrorEnvelope,
    InferRequestEnvelope,
    InferResponseEnvelope,
    decode_envelope,
    frame,
)
from shared.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidInput,
    ModelNotFound,
    TetherError,
    TooManyRequests,
    Unavailable,
    Unsupported,
)
from shared.mqtt import Message, MqttClient, MqttError, TlsConfig
from shared.protocol import InferenceRequest
from shared.tracing import current_request_id

log = logging.getLogger(__name__)


@dataclass
class CloudReply:
    """A cloud answer: outputs plus where and how long it took."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    worker: str | None = None
    #: Round trip as the edge saw it, and the cloud's own queue + compute time.
    round_trip_ms: float = 0.0
    cloud_ms: float = 0.0
    compute_ms: float = 0.0
    attempts: int = 1
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def network_ms(self) -> float:
        """Time on the wire and in the broker: round trip minus the cloud's time."""
        return max(self.round_trip_ms - self.cloud_ms, 0.0)


def new_client_id(device_id: str) -> str:
    """A client id unique per process and start, and unguessable:
    ``tether-<device>-<pid>-<random>`` (shared/client_ids.py)."""
    return random_client_id(device_id, str(os.getpid()))


class Uplink:
    """Request/response over MQTT 5 with deadlines, retries and a circuit breaker."""

    def __init__(
        self,
        broker_url: str,
        device_id: str,
        settings: UplinkSettings | None = None,
        *,
        metrics: EdgeMetrics | None = None,
        client_id: str | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.settings = settings or UplinkSettings()
        self.device_id = topics.check_segment(device_id, "device id")
        self.client_id = client_id or new_client_id(device_id)
        self.reply_topic = topics.cloud_replies(device_id, self.client_id)
        self.metrics = metrics
        self.breaker = CircuitBreaker(
            "the cloud",
            failure_threshold=self.settings.breaker_failures,
            cooldown_s=self.settings.breaker_cooldown_s,
        )
        if metrics is not None:
            self.breaker.add_listener(
                lambda state: metrics.breaker_open.set(1 if state is BreakerState.OPEN else 0)
            )
        self.broker_url = broker_url
        self.tls = tls
        self.client = MqttClient(broker_url, self.client_id, tls=tls)
        self.client.add_connection_listener(self._on_connection)
        self.client.subscribe(self.reply_topic, self._on_reply, qos=0)
        self._pending: dict[bytes, Future[Message]] = {}
        #: Exchanges of many replies (text streams): correlation -> who takes each reply
        #: (or the error that ended the connection).
        self._listeners: dict[bytes, Callable[[Message | TetherError], None]] = {}
        self._lock = threading.Lock()
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def connected(self) -> bool:
        return self.client.connected

    def start(self) -> None:
        """Connect in the background; wait briefly for the first connection, never fail.

        A broker that is down at start-up only makes cloud routes fail fast until it is up.
        """
        if self._started:
            return
        self._started = True
        self.client.start(wait_s=None)
        if self.settings.connect_wait_s and not self.client.wait_connected(
            self.settings.connect_wait_s
        ):
            log.warning(
                "uplink %s: no broker yet (%s); cloud routes fail fast until it is up",
                self.client_id,
                self.client.last_error,
            )
        threading.Thread(target=self._check_broker, name="broker-check", daemon=True).start()

    def _check_broker(self) -> None:
        """Measure the broker once connected; log what it means, export it (never raises)."""
        while self._started and not self.client.wait_connected(1.0):
            pass
        if not self._started:
            return
        try:
            check = check_broker(self.broker_url, self.device_id, self.client_id, tls=self.tls)
        except Exception as exc:  # a broker that refuses the probe topic, or went away
            log.info("could not measure the broker's round trip: %s", exc)
            return
        advice = check.advice()
        if advice is not None:
            log.warning("MQTT broker %s: %s", self.client.address.url(), advice)
        else:
            log.info(
                "MQTT broker %s: round trip %.2f ms (QoS 0), %.2f ms (QoS 1)",
                self.client.address.url(),
                check.qos0_ms,
                check.qos1_ms,
            )
        if self.metrics is not None:
            self.metrics.broker_round_trip.labels("0").set(check.qos0_ms / 1000.0)
            self.metrics.broker_round_trip.labels("1").set(check.qos1_ms / 1000.0)

    def close(self) -> None:
        """Fail what is in flight and disconnect."""
        if not self._started:
            return
        self._started = False
        self._fail_pending(Unavailable("the uplink is shutting down"))
        self.client.stop()

    # ------------------------------------------------------------------ requests

    def request(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        datatypes: Mapping[str, str] | None = None,
        outputs: Sequence[str] | None = None,
        version: str | None = None,
        timeout_s: float | None = None,
        trace_id: str | None = None,
    ) -> CloudReply:
        """Run ``model`` in the cloud on ``inputs``; the answer or a Tether error in time."""
        timeout = timeout_s or self.settings.timeout_s
        started = time.monotonic()
        deadline = started + timeout
        try:
            self.breaker.acquire()
        except Unavailable:
            self.count(model, "rejected")
            raise
        try:
            reply = self._send(model, version, inputs, datatypes, outputs, deadline, trace_id)
        except TetherError as exc:
            self.settle(exc)
            self.count(model, outcome(exc))
            raise
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.success()
        self.count(model, "ok")
        if self.metrics is not None:
            self.metrics.cloud_round_trip.labels(model).observe(reply.round_trip_ms / 1000.0)
        return reply

    def _send(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, np.ndarray],
        datatypes: Mapping[str, str] | None,
        outputs: Sequence[str] | None,
        deadline: float,
        trace_id: str | None,
    ) -> CloudReply:
        request_id = uuid.uuid4().hex
        header, blobs = build_request(
            inputs,
            datatypes,
            request_id=request_id,
            outputs=[OutputRequest(name, binary=True) for name in outputs or ()],
            binary=True,
        )
        envelope = InferRequestEnvelope(
            request_id=request_id,
            model=model,
            version=version,
            deadline=time.time() + (deadline - time.monotonic()),
            sent_at=time.time(),
            trace_id=trace_id or request_id,
            agent_version=__version__,
            request=InferenceRequest.model_validate(header),
        )
        payload = frame(envelope.dump(), blobs)
        log.debug("cloud request %s for %s (trace %s)", request_id, model, envelope.trace_id)
        correlation = request_id.encode()
        future: Future[Message] = Future()
        with self._lock:
            self._check_room()
            self._pending[correlation] = future
        attempts = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(
                        f"cloud model {model!r} did not answer within the deadline "
                        f"({attempts} attempt{'s' if attempts != 1 else ''})"
                    )
                sent = time.monotonic()
                self.publish_request(model, payload, correlation, remaining)
                attempts += 1
                last = attempts >= self.settings.max_attempts
                wait = remaining if last else min(remaining, self.settings.attempt_timeout_s)
                try:
                    message = future.result(timeout=wait)
                except FutureTimeout:
                    if last:
                        raise DeadlineExceeded(
                            f"cloud model {model!r} did not answer within the deadline "
                            f"({attempts} attempt{'s' if attempts != 1 else ''})"
                        ) from None
                    log.info("no reply to %s after %.2fs; sending it again", request_id, wait)
                    continue
                round_trip_ms = (time.monotonic() - sent) * 1000.0
                reply = _decode_reply(message, model, version)
                reply.round_trip_ms = round_trip_ms
                reply.attempts = attempts
                return reply
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    def _check_room(self) -> None:
        """Refuse a request past ``max_pending`` in flight (call with the lock held)."""
        in_flight = len(self._pending) + len(self._listeners)
        if in_flight >= self.settings.max_pending:
            raise TooManyRequests(f"{in_flight} cloud requests already in flight", retry_after=1.0)

    def listen(self, correlation: bytes, handler: Callable[[Message | TetherError], None]) -> None:
        """Send every reply with ``correlation`` to ``handler`` (network thread; quick) until
        :meth:`unlisten`; a lost connection is handed over as a :class:`CloudUnreachable`."""
        with self._lock:
            self._check_room()
            self._listeners[correlation] = handler

    def unlisten(self, correlation: bytes) -> None:
        with self._lock:
            self._listeners.pop(correlation, None)

    def publish_request(
        self, model: str, payload: bytes, correlation: bytes, expiry_s: float
    ) -> None:
        """Publish one request for ``model`` (QoS 0, answered on this connection's reply topic);
        a broker that cannot be reached is :class:`CloudUnreachable` at once."""
        try:
            self.client.publish(
                topics.cloud_request(self.device_id, model),
                payload,
                qos=0,
                response_topic=self.reply_topic,
                correlation_data=correlation,
                expiry_s=expiry_s,
            )
        except MqttError as exc:
            raise CloudUnreachable(f"the cloud is unreachable: {exc.message}") from None

    def settle(self, exc: TetherError) -> None:
        """Tell the breaker what a failed request says about the cloud's health."""
        if isinstance(exc, CloudUnreachable | TooManyRequests) or exc.status < 500:
            self.breaker.release()  # broker down (already fast) or the caller's own fault
        else:
            self.breaker.failure()

    def count(self, model: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.cloud_requests.labels(model, outcome).inc()

    # ------------------------------------------------------------------ MQTT side

    def _on_reply(self, message: Message) -> None:
        """Hand a reply to the request waiting on its correlation id (network thread)."""
        correlation = message.correlation_data
        with self._lock:
            future = self._pending.get(correlation) if correlation else None
            listener = self._listeners.get(correlation) if correlation else None
        if listener is not None:
            listener(message)
            return
        if future is None:
            log.debug("reply on %s matches no pending request (late or duplicate)", message.topic)
            return
        with contextlib.suppress(InvalidStateError):  # a second reply to an answered request
            future.set_result(message)

    def _on_connection(self, connected: bool) -> None:
        if not connected:
            self._fail_pending(CloudUnreachable("lost the connection to the broker"))

    def _fail_pending(self, exc: TetherError) -> None:
        with self._lock:
            pending = list(self._pending.values())
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener(exc)
        for future in pending:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(exc)


class CloudUnreachable(Unavailable):
    """The broker cannot be reached, so the cloud cannot be asked (fails fast)."""

    reason = "cloud_unreachable"


def outcome(exc: TetherError) -> str:
    if isinstance(exc, CloudUnreachable):
        return "unreachable"
    if isinstance(exc, DeadlineExceeded):
        return "timeout"
    if isinstance(exc, TooManyRequests):
        return "rejected"
    return "error"


_STATUS_ERRORS: dict[int, type[TetherError]] = {
    400: InvalidInput,
    404: ModelNotFound,
    501: Unsupported,
    503: Unavailable,
    504: DeadlineExceeded,
}


def cloud_error(envelope: ErrorEnvelope) -> TetherError:
    """The Tether error an :class:`ErrorEnvelope` stands for, keeping its status."""
    message = f"cloud: {envelope.error}"
    if envelope.status == 429:
        return TooManyRequests(message)
    cls = _STATUS_ERRORS.get(envelope.status)
    if cls is not None:
        return cls(message)
    return TetherError(message, status=envelope.status)


def _decode_reply(message: Message, model: str, version: str | None) -> CloudReply:
    try:
        envelope, tail = decode_envelope(message.payload)
    except TetherError as exc:
        raise InternalError(f"cloud sent an unreadable reply: {exc.message}") from None
    if isinstance(envelope, ErrorEnvelope):
        raise cloud_error(envelope)
    if not isinstance(envelope, InferResponseEnvelope):
        raise InternalError(f"cloud replied with a {envelope.kind!r} envelope")
    try:
        response = decode_response_parts(envelope.response, tail)
    except TetherError as exc:
        raise InternalError(f"cloud sent an unreadable response: {exc.message}") from None
    outputs = {str(out["name"]): out["data"] for out in response["outputs"]}
    queue_ms = envelope.queue_ms or 0.0
    compute_ms = envelope.compute_ms or 0.0
    return CloudReply(
        outputs=outputs,
        model_name=str(response.get("model_name") or model),
        model_version=str(response.get("model_version") or version or ""),
        worker=envelope.worker,
        cloud_ms=queue_ms + compute_ms,
        compute_ms=compute_ms,
        parameters=dict(response.get("parameters") or {}),
    )


class CloudRuntime(ComposedRuntime):
    """A cloud model behind the runtime interface: ``infer()`` goes up the uplink.

    Its metadata (inputs, outputs, FLOPs) comes from the route's declaration or from the
    model's files in the local repository, which are read, never loaded.
    """

    platform = "tether_cloud"
    served_by = "cloud"

    def __init__(
        self,
        name: str,
        uplink: Uplink,
        *,
        cloud_model: str | None = None,
        cloud_version: str | None = None,
        inputs: Sequence[TensorSpec] = (),
        outputs: Sequence[TensorSpec] = (),
        flops: int | None = None,
        max_batch_size: int = 0,
        timeout_s: float | None = None,
        price_per_request: float = 0.0,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        super().__init__(name, cloud_version or "cloud")
        self.uplink = uplink
        self.cloud_model = cloud_model or name
        self.cloud_version = cloud_version
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.flops = flops
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.price_per_request = price_per_request
        self.metrics = metrics
        self.provider = "cloud"

    @property
    def ready(self) -> bool:
        """Ready while the broker is connected and the breaker lets calls through."""
        return self.uplink.connected and self.uplink.breaker.state is not BreakerState.OPEN

    def load(self) -> None:
        self.mark_ready()

    def infer(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> Prediction:
        """Ask the cloud; the prediction says which cloud model and version answered."""
        datatypes = {spec.name: spec.datatype for spec in self.inputs}
        reply = self.uplink.request(
            self.cloud_model,
            inputs,
            datatypes={k: v for k, v in datatypes.items() if k in inputs} or None,
            outputs=list(output_names) if output_names else [s.name for s in self.outputs],
            version=self.cloud_version,
            timeout_s=self.timeout_s,
            trace_id=current_request_id(),
        )
        if self.metrics is not None and self.price_per_request:
            self.metrics.cloud_cost.labels(self.cloud_model).inc(self.price_per_request)
        return Prediction(
            outputs=reply.outputs,
            model_name=reply.model_name,
            model_version=reply.model_version,
            compute_ms=reply.compute_ms,
            provenance=cloud_provenance(reply),
        )


def cloud_provenance(reply: CloudReply) -> Provenance:
    """The provenance of a cloud answer."""
    return Provenance(
        served_by="cloud",
        route="cloud",
        model=reply.model_name,
        model_version=reply.model_version,
        network_ms=reply.network_ms,
        cloud_ms=reply.cloud_ms,
        cloud_worker=reply.worker or None,
        cloud_attempts=reply.attempts,
    )
