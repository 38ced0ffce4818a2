"""The uplink against a real Mosquitto and a small responder built on the MQTT adapter.

Each test runs on Tether's tuned broker and on a stock Mosquitto 2.0 (only a listener),
which leaves Nagle's algorithm on and keeps its default queue limits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge.breaker import BreakerOpen
from edge.broker_check import STALL_MS, check_broker
from edge.settings import UplinkSettings
from edge.status import Scrape, render_edge
from edge.uplink import CloudUnreachable, Uplink
from harness.broker import BROKER_KINDS, Broker
from serving.metrics import EdgeMetrics
from shared import topics
from shared.codec import build_response, decode_request_parts
from shared.envelopes import ErrorEnvelope, InferRequestEnvelope, decode_envelope, frame
from shared.errors import DeadlineExceeded, ModelNotFound, TetherError
from shared.mqtt import Message, MqttClient


class Responder:
    """A stand-in cloud worker: answers ``y = 2 * x`` (or as ``mode`` says) on reply topics."""

    def __init__(self, url: str, name: str = "responder") -> None:
        self.client = MqttClient(url, f"{name}-{id(self)}")
        self.mode = "answer"
        self.seen: list[InferRequestEnvelope] = []
        self.expiries: list[int | None] = []
        self.qos: list[int] = []
        self.drop_first = 0
        self._lock = threading.Lock()
        self.client.subscribe(topics.cloud_request_filter(), self._handle)

    def start(self) -> Responder:
        self.client.start()
        return self

    def stop(self) -> None:
        self.client.stop()

    def _handle(self, message: Message) -> None:
        envelope, tail = decode_envelope(message.payload)
        assert isinstance(envelope, InferRequestEnvelope)
        with self._lock:
            self.seen.append(envelope)
            self.expiries.append(message.expiry_s)
            self.qos.append(message.qos)
            if self.drop_first > 0:
                self.drop_first -= 1
                return
        if self.mode == "silent":
            return
        assert message.response_topic and message.correlation_data
        if self.mode == "error":
            reply = frame(
                ErrorEnvelope.from_error(
                    envelope.request_id, ModelNotFound(f"no model {envelope.model!r}")
                ).dump()
            )
        else:
            request = decode_request_parts(envelope.request, tail)
            outputs = {"y": request.inputs["x"] * 2}
            header, blobs = build_response(
                model_name=envelope.model,
                model_version="7",
                outputs=outputs,
                requested=request.outputs,
            )
            reply = frame(
                {
                    "kind": "infer_response",
                    "request_id": envelope.request_id,
                    "worker": "w1",
                    "queue_ms": 1.0,
                    "compute_ms": 2.0,
                    "response": header,
                    "schema_version": "1.0",
                },
                blobs,
            )
        self.client.publish(  # as the cloud worker does: at the request's QoS
            message.response_topic,
            reply,
            qos=message.qos,
            correlation_data=message.correlation_data,
        )


@pytest.fixture(params=BROKER_KINDS)
def any_broker(request: pytest.FixtureRequest) -> Broker:
    """The session's tuned broker, then its stock one."""
    broker = request.getfixturevalue("stock_broker" if request.param == "stock" else "broker")
    assert isinstance(broker, Broker)
    return broker


@pytest.fixture
def responder(any_broker: Broker) -> Iterator[Responder]:
    instance = Responder(any_broker.url).start()
    yield instance
    instance.stop()


def make_uplink(url: str, **settings: float) -> Uplink:
    uplink = Uplink(url, "dev1", UplinkSettings(**settings), metrics=EdgeMetrics())
    uplink.start()
    return uplink


X = np.arange(8, dtype=np.float32).reshape(2, 4)
ROUND_TRIP = "tether_broker_round_trip_seconds"


def test_request_response_with_binary_tensors(any_broker: Broker, responder: Responder) -> None:
    uplink = make_uplink(any_broker.url)
    try:
        reply = uplink.request("big", {"x": X}, outputs=["y"], timeout_s=2.0)
    finally:
        uplink.close()
    np.testing.assert_array_equal(reply.outputs["y"], X * 2)
    assert reply.model_name == "big" and reply.model_version == "7"
    assert reply.worker == "w1" and reply.cloud_ms == 3.0 and reply.attempts == 1
    seen = responder.seen[-1]
    assert seen.model == "big" and seen.deadline is not None
    assert seen.deadline - time.time() < 2.0
    assert responder.expiries[-1] in (1, 2)  # the deadline, rounded up to whole seconds


def test_lost_reply_is_sent_again_within_the_deadline(
    any_broker: Broker, responder: Responder
) -> None:
    responder.drop_first = 1
    uplink = make_uplink(any_broker.url, attempt_timeout_s=0.3)
    try:
        started = time.monotonic()
        reply = uplink.request("big", {"x": X}, timeout_s=3.0)
        elapsed = time.monotonic() - started
    finally:
        uplink.close()
    assert reply.attempts == 2
    assert 0.3 <= elapsed < 1.5
    assert responder.seen[-1].request_id == responder.seen[-2].request_id


def test_silent_cloud_fails_at_the_deadline_then_the_breaker_opens(
    any_broker: Broker, responder: Responder
) -> None:
    responder.mode = "silent"
    uplink = make_uplink(any_broker.url, attempt_timeout_s=0.1, breaker_failures=2)
    try:
        for _ in range(2):
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                uplink.request("big", {"x": X}, timeout_s=0.3)
            assert time.monotonic() - started < 0.6
        started = time.monotonic()
        with pytest.raises(BreakerOpen) as info:
            uplink.request("big", {"x": X}, timeout_s=0.3)
        assert time.monotonic() - started < 0.05
        assert info.value.status == 503
        metrics = uplink.metrics
        assert metrics is not None
        body = metrics.render()[0].decode()
        assert 'tether_cloud_requests_total{model="big",outcome="timeout"} 2.0' in body
        assert "tether_cloud_breaker_open 1.0" in body
    finally:
        uplink.close()


def test_breaker_closes_after_cooldown_when_the_cloud_answers(
    any_broker: Broker, responder: Responder
) -> None:
    responder.mode = "silent"
    uplink = make_uplink(
        any_broker.url, attempt_timeout_s=0.1, breaker_failures=1, breaker_cooldown_s=0.3
    )
    try:
        with pytest.raises(DeadlineExceeded):
            uplink.request("big", {"x": X}, timeout_s=0.2)
        with pytest.raises(BreakerOpen):
            uplink.request("big", {"x": X}, timeout_s=0.2)
        responder.mode = "answer"
        time.sleep(0.35)
        assert uplink.request("big", {"x": X}, timeout_s=1.0).outputs["y"].shape == (2, 4)
        assert uplink.breaker.state.value == "closed"
    finally:
        uplink.close()


def test_cloud_error_keeps_its_status_and_does_not_trip_the_breaker(
    any_broker: Broker, responder: Responder
) -> None:
    responder.mode = "error"
    uplink = make_uplink(any_broker.url, breaker_failures=1)
    try:
        for _ in range(3):
            with pytest.raises(TetherError) as info:
                uplink.request("nope", {"x": X}, timeout_s=2.0)
            assert info.value.status == 404
            assert "cloud: no model 'nope'" in info.value.message
    finally:
        uplink.close()


def test_a_round_trip_waits_on_no_delayed_ack(any_broker: Broker, responder: Responder) -> None:
    """On a stock Mosquitto a QoS 1 round trip waits for a delayed ACK every time (the
    broker's PUBACK holds the reply back under Nagle's algorithm; the timer is >= 40 ms on
    Linux), so even the fastest of 15 would take 40 ms. The fastest under 20 ms shows no
    such wait, while load on the machine (which slows some round trips) cannot fail it."""
    uplink = make_uplink(any_broker.url)
    try:
        uplink.request("big", {"x": X}, timeout_s=2.0)  # connected and warm
        round_trips = sorted(
            uplink.request("big", {"x": X}, timeout_s=2.0).round_trip_ms for _ in range(15)
        )
    finally:
        uplink.close()
    assert round_trips[0] < 20.0, round_trips
    assert responder.seen and {qos for qos in responder.qos} == {0}


def test_the_broker_check_tells_a_broker_without_tcp_nodelay(any_broker: Broker) -> None:
    check = check_broker(any_broker.url, "dev1", f"check-{any_broker.kind}")
    assert check.nagle_stall == any_broker.stock, check
    advice = check.advice()
    assert (advice is not None and "set_tcp_nodelay true" in advice) == any_broker.stock
    assert check.qos0_ms < STALL_MS  # the uplink's own exchanges never wait on the broker


def test_the_uplink_measures_its_broker_for_the_log_and_the_metrics(
    any_broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="edge.uplink"):
        uplink = make_uplink(any_broker.url)
        try:
            assert uplink.metrics is not None
            registry = uplink.metrics.registry
            until = time.monotonic() + 15.0  # two connections and 12 round trips, or a stall
            while registry.get_sample_value(ROUND_TRIP, {"qos": "1"}) is None:
                assert time.monotonic() < until, "the uplink never measured its broker"
                time.sleep(0.05)
            qos0 = registry.get_sample_value(ROUND_TRIP, {"qos": "0"})
            assert qos0 is not None and qos0 < STALL_MS / 1000.0
            status = "\n".join(render_edge(Scrape.parse(uplink.metrics.render()[0].decode())))
        finally:
            uplink.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("set_tcp_nodelay true" in w for w in warnings) == any_broker.stock, warnings
    # `tether status` reads the same measurement from /metrics
    assert "broker round trip" in status and "ms at QoS 1" in status
    assert ("WARNING" in status and "set_tcp_nodelay true" in status) == any_broker.stock


@pytest.mark.parametrize("fresh_broker", BROKER_KINDS, indirect=True)
def test_broker_down_fails_fast_and_recovers(fresh_broker: Broker) -> None:
    responder = Responder(fresh_broker.url).start()
    uplink = make_uplink(fresh_broker.url)
    try:
        assert uplink.request("big", {"x": X}).outputs["y"][1, 0] == 8
        responder.mode = "silent"
        pending: list[BaseException] = []

        def hang() -> None:
            try:
                uplink.request("big", {"x": X}, timeout_s=10.0)
            except BaseException as exc:
                pending.append(exc)

        waiter = threading.Thread(target=hang)
        waiter.start()
        time.sleep(0.2)
        started = time.monotonic()
        fresh_broker.kill()
        waiter.join(timeout=3)
        assert not waiter.is_alive(), "a request in flight hung after the broker died"
        assert isinstance(pending[0], CloudUnreachable)
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(CloudUnreachable) as info:
            uplink.request("big", {"x": X})
        assert time.monotonic() - started < 0.05
        assert info.value.status == 503
        responder.mode = "answer"
        fresh_broker.start()
        back = time.monotonic()
        while True:
            try:
                uplink.request("big", {"x": X}, timeout_s=1.0)
                break
            except TetherError:
                assert time.monotonic() - back < 5.0, "uplink did not recover within 5 s"
                time.sleep(0.1)
    finally:
        uplink.close()
        responder.stop()


def test_reply_topic_is_per_connection() -> None:
    first = Uplink("mqtt://127.0.0.1:1", "dev1")
    second = Uplink("mqtt://127.0.0.1:1", "dev1")
    assert first.reply_topic != second.reply_topic
    assert first.reply_topic.startswith("tether/dev1/cloud/replies/tether-dev1-")
