"""The uplink against a real Mosquitto and a small responder built on the MQTT adapter."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from edge.breaker import BreakerOpen
from edge.metrics import EdgeMetrics
from edge.settings import UplinkSettings
from edge.uplink import CloudUnreachable, Uplink
from shared import topics
from shared.codec import build_response, decode_request_parts
from shared.envelopes import ErrorEnvelope, InferRequestEnvelope, decode_envelope, frame
from shared.errors import DeadlineExceeded, ModelNotFound, TetherError
from shared.mqtt import Message, MqttClient
from tests.broker import Broker


class Responder:
    """A stand-in cloud worker: answers ``y = 2 * x`` (or as ``mode`` says) on reply topics."""

    def __init__(self, url: str, name: str = "responder") -> None:
        self.client = MqttClient(url, f"{name}-{id(self)}")
        self.mode = "answer"
        self.seen: list[InferRequestEnvelope] = []
        self.expiries: list[int | None] = []
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
        self.client.publish(
            message.response_topic, reply, correlation_data=message.correlation_data
        )


@pytest.fixture
def responder(broker: Broker) -> Iterator[Responder]:
    instance = Responder(broker.url).start()
    yield instance
    instance.stop()


def make_uplink(url: str, **settings: float) -> Uplink:
    uplink = Uplink(url, "dev1", UplinkSettings(**settings), metrics=EdgeMetrics())
    uplink.start()
    return uplink


X = np.arange(8, dtype=np.float32).reshape(2, 4)


def test_request_response_with_binary_tensors(broker: Broker, responder: Responder) -> None:
    uplink = make_uplink(broker.url)
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


def test_lost_reply_is_sent_again_within_the_deadline(broker: Broker, responder: Responder) -> None:
    responder.drop_first = 1
    uplink = make_uplink(broker.url, attempt_timeout_s=0.3)
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
    broker: Broker, responder: Responder
) -> None:
    responder.mode = "silent"
    uplink = make_uplink(broker.url, attempt_timeout_s=0.1, breaker_failures=2)
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
    broker: Broker, responder: Responder
) -> None:
    responder.mode = "silent"
    uplink = make_uplink(
        broker.url, attempt_timeout_s=0.1, breaker_failures=1, breaker_cooldown_s=0.3
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
    broker: Broker, responder: Responder
) -> None:
    responder.mode = "error"
    uplink = make_uplink(broker.url, breaker_failures=1)
    try:
        for _ in range(3):
            with pytest.raises(TetherError) as info:
                uplink.request("nope", {"x": X}, timeout_s=2.0)
            assert info.value.status == 404
            assert "cloud: no model 'nope'" in info.value.message
    finally:
        uplink.close()


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
