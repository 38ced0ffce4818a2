"""The cloud worker against a real Mosquitto and real ONNX Runtime."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pytest_mock import MockerFixture

from harness.broker import Broker
from tests.cloud.conftest import Asker, WorkerFactory, reference


def rows(n: int, features: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, features)).astype(np.float32)


def test_result_equals_onnxruntime(
    make_worker: WorkerFactory, asker: Asker, repository_dir: Path
) -> None:
    worker, calls = make_worker()
    x = rows(3)
    request_id = asker.ask("dense", x)
    (reply,) = asker.collect(1)
    assert reply.kind == "infer_response"
    assert reply.header["request_id"] == request_id
    assert reply.header["worker"] == worker.worker_id
    assert reply.header["batch_size"] == 3
    response = reply.header["response"]
    assert response["model_name"] == "dense"
    assert response["model_version"] == "1"
    assert response["parameters"]["served_by"] == "cloud"
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 3 * 3 * 4
    np.testing.assert_allclose(reply.outputs["y"], reference(repository_dir, "dense", x), 1e-6)
    assert reply.message.correlation_data is not None
    assert calls.rows == [3]
    assert worker.metrics.sample("tether_cloud_requests_total", model="dense", version="1") == 1


def test_json_outputs_when_the_request_asks_json(make_worker: WorkerFactory, asker: Asker) -> None:
    make_worker()
    asker.ask("dense", rows(2), binary=False)
    (reply,) = asker.collect(1)
    output = reply.header["response"]["outputs"][0]
    assert "data" in output and "parameters" not in output
    assert reply.outputs["y"].shape == (2, 3)


def test_two_workers_in_one_share_group_split_the_load(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    first, _ = make_worker()
    second, _ = make_worker()
    for i in range(40):
        asker.ask("dense", rows(1, seed=i))
    replies = asker.collect(40)
    by_worker = {r.header["worker"] for r in replies}
    assert by_worker == {first.worker_id, second.worker_id}
    assert len({r.header["request_id"] for r in replies}) == 40
    assert asker.quiet(0.2) == []


def test_expired_request_is_never_run(make_worker: WorkerFactory, asker: Asker) -> None:
    worker, calls = make_worker()
    asker.ask("dense", rows(1), deadline_s=-1.0)
    assert asker.quiet(0.3) == []
    assert calls.rows == []
    assert (
        worker.metrics.sample("tether_cloud_failures_total", model="dense", reason="expired") == 1
    )


def test_request_expiring_in_the_queue_is_dropped_at_dequeue(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    worker, calls = make_worker(delay_s=0.4, worker_threads=1)
    asker.ask("dense", rows(1))  # occupies the only thread for 0.4 s
    asker.ask("dense", rows(1), deadline_s=0.15)
    (reply,) = asker.collect(1)
    assert reply.kind == "infer_response"
    assert asker.quiet(0.3) == []
    assert calls.rows == [1]
    assert (
        worker.metrics.sample("tether_cloud_failures_total", model="dense", reason="expired") == 1
    )
    assert worker.metrics.sample("tether_cloud_inflight") == 0


def test_mqtt_message_expiry_counts_as_a_deadline(make_worker: WorkerFactory, asker: Asker) -> None:
    worker, calls = make_worker(delay_s=1.3, worker_threads=1)
    asker.ask("dense", rows(1))
    payload = asker.envelope("dense", rows(1), deadline_s=None)  # only the MQTT expiry
    asker.publish("dense", payload, expiry_s=1)
    (_reply,) = asker.collect(1, timeout_s=5)
    assert asker.quiet(0.3) == []
    assert calls.rows == [1]
    assert (
        worker.metrics.sample("tether_cloud_failures_total", model="dense", reason="expired") == 1
    )


def test_duplicate_while_running_is_answered_once(make_worker: WorkerFactory, asker: Asker) -> None:
    worker, calls = make_worker(delay_s=0.3)
    payload = asker.envelope("dense", rows(2))
    asker.publish("dense", payload, correlation=b"c1")
    asker.publish("dense", payload, correlation=b"c1")
    (reply,) = asker.collect(1)
    assert reply.kind == "infer_response"
    assert asker.quiet(0.4) == []
    assert calls.rows == [2]
    assert worker.metrics.sample("tether_cloud_duplicates_total", outcome="dropped") == 1


def test_duplicate_after_the_answer_gets_the_same_answer_without_a_second_run(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    worker, calls = make_worker()
    payload = asker.envelope("dense", rows(2))
    asker.publish("dense", payload, correlation=b"c1")
    (first,) = asker.collect(1)
    asker.publish("dense", payload, correlation=b"c1")
    (second,) = asker.collect(1)
    assert second.message.payload == first.message.payload
    assert calls.rows == [2]
    assert worker.metrics.sample("tether_cloud_duplicates_total", outcome="resent") == 1


def test_same_request_id_from_another_device_is_another_request(
    make_worker: WorkerFactory, asker: Asker, broker: Broker
) -> None:
    _, calls = make_worker()
    payload = asker.envelope("dense", rows(1), request_id="same")
    other = Asker(broker, device="dev2")  # a reply goes only to the asking device's topics
    try:
        asker.publish("dense", payload)
        other.publish("dense", payload)
        asker.collect(1)
        other.collect(1)
    finally:
        other.close()
    assert calls.rows == [1, 1]


@pytest.mark.parametrize(
    ("payload", "status", "reason", "request_id"),
    [
        (b"\x00\x00", 400, "invalid_input", "unknown"),
        (b"not json at all", 400, "invalid_input", "unknown"),
        (b'{"kind": "infer_request", "request_id": "r1"}', 400, "invalid_input", "r1"),
        (
            b'{"kind": "infer_request", "request_id": "r2", "schema_version": "2.0",'
            b' "model": "dense", "request": {"inputs": []}}',
            400,
            "schema_version",
            "r2",
        ),
        (
            b'{"kind": "infer_response", "request_id": "r3", "response": {}}',
            400,
            "invalid_input",
            "r3",
        ),
    ],
)
def test_bad_payloads_get_an_error_envelope(
    make_worker: WorkerFactory,
    asker: Asker,
    payload: bytes,
    status: int,
    reason: str,
    request_id: str,
) -> None:
    make_worker()
    asker.publish("dense", payload)
    (reply,) = asker.collect(1)
    assert reply.kind == "error"
    assert (reply.header["status"], reply.header["reason"]) == (status, reason)
    assert reply.header["request_id"] == request_id
    assert reply.header["error"]


def test_unknown_model_gets_404(make_worker: WorkerFactory, asker: Asker) -> None:
    make_worker()
    asker.ask("nope", rows(1))
    (reply,) = asker.collect(1)
    assert (reply.kind, reply.header["status"], reply.header["reason"]) == (
        "error",
        404,
        "not_found",
    )


@pytest.mark.parametrize("qos", [0, 1])
def test_the_answer_goes_back_at_the_requests_qos(
    make_worker: WorkerFactory, asker: Asker, qos: int
) -> None:
    """The uplink asks at QoS 0 (no PUBACK to stall on a stock broker) and gets QoS 0 back;
    a requester that asks at QoS 1 still gets QoS 1."""
    make_worker()
    asker.publish("dense", asker.envelope("dense", rows(1)), qos=qos)
    (reply,) = asker.collect(1)  # the asker subscribes at QoS 1: it gets what was sent
    assert reply.kind == "infer_response" and reply.message.qos == qos


def test_made_up_model_names_do_not_grow_the_metrics(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    """Topics name the model and any device can make one up: failures for models the
    worker does not serve share one ``unknown`` label, and no device id is a label."""
    import urllib.request

    from harness.broker import free_port

    worker, _ = make_worker(metrics_port=free_port())
    for i in range(40):
        asker.ask(f"made-up-{i}", rows(1))
    for i in range(10):
        asker.publish(f"garbage-{i}", b"not an envelope")
    asker.publish("dense", b"not an envelope")
    replies = asker.collect(51)
    assert sorted(r.header["status"] for r in replies) == [400] * 11 + [404] * 40
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics") as response:
        text = response.read().decode()
    assert "made-up" not in text and "garbage" not in text and asker.device not in text
    assert 'tether_cloud_failures_total{model="unknown",reason="not_found"} 40.0' in text
    assert 'tether_cloud_failures_total{model="unknown",reason="invalid_input"} 10.0' in text
    assert 'tether_cloud_failures_total{model="dense",reason="invalid_input"} 1.0' in text


def test_invalid_tensors_get_400_and_the_worker_lives_on(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    make_worker()
    asker.ask("dense", rows(1, features=5))  # wrong shape
    asker.ask("dense", rows(1), outputs=["nope"])  # unknown output
    nan = rows(1)
    nan[0, 0] = np.nan
    asker.ask("dense", nan)
    errors = asker.collect(3)
    assert {(r.kind, r.header["status"]) for r in errors} == {("error", 400)}
    asker.ask("dense", rows(1))
    (ok,) = asker.collect(1)
    assert ok.kind == "infer_response"


def test_model_named_in_envelope_must_match_topic(make_worker: WorkerFactory, asker: Asker) -> None:
    _, calls = make_worker()
    asker.publish("wide", asker.envelope("dense", rows(1)))
    (reply,) = asker.collect(1)
    assert (reply.kind, reply.header["status"]) == ("error", 400)
    assert calls.rows == []


def test_batching_combines_concurrent_requests(
    make_worker: WorkerFactory, asker: Asker, repository_dir: Path
) -> None:
    worker, calls = make_worker(batching={"max_batch_size": 16, "max_queue_delay_ms": 250})
    inputs = {asker.ask("dense", x): x for x in (rows(n, seed=n) for n in (1, 2, 3, 1, 2))}
    replies = asker.collect(5)
    assert max(calls.rows) > 1
    assert sum(calls.rows) == 9
    for reply in replies:
        x = inputs[reply.header["request_id"]]
        assert reply.outputs["y"].shape == (len(x), 3)
        np.testing.assert_allclose(
            reply.outputs["y"], reference(repository_dir, "dense", x), rtol=1e-5, atol=1e-6
        )
    assert max(r.header["batch_size"] for r in replies) > 1
    assert worker.metrics.sample("tether_cloud_batch_size_count", model="dense") == len(calls.rows)


def test_batching_respects_max_batch_size_and_keeps_models_apart(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    _, calls = make_worker(
        batching={"max_batch_size": 2, "max_queue_delay_ms": 200, "models": {"wide": {}}}
    )
    for i in range(4):
        asker.ask("dense", rows(1, seed=i))
    for i in range(2):
        asker.ask("wide", rows(1, features=8, seed=i))
    asker.collect(6)
    assert sorted(calls.rows) == [1, 1, 2, 2]  # dense in pairs, wide (batching off) alone


def test_full_queue_answers_503_overloaded(make_worker: WorkerFactory, asker: Asker) -> None:
    _worker, calls = make_worker(delay_s=0.3, worker_threads=1, queue_limit=1)
    for i in range(4):
        asker.ask("dense", rows(1, seed=i))
    replies = asker.collect(4)
    overloaded = [r for r in replies if r.kind == "error"]
    assert overloaded and all(r.header["status"] == 503 for r in overloaded)
    assert {r.header["reason"] for r in overloaded} == {"overloaded"}
    assert len(calls.rows) == 4 - len(overloaded)


def test_stop_with_drain_answers_everything_accepted(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    worker, calls = make_worker(delay_s=0.2, worker_threads=1)
    for i in range(4):
        asker.ask("dense", rows(1, seed=i))
    worker.stop(drain=True)  # at once: some requests may still be on their way to us
    replies = asker.collect(4, timeout_s=1.0)  # already published before stop() returned
    assert all(r.kind == "infer_response" for r in replies)
    assert calls.rows == [1, 1, 1, 1]
    asker.ask("dense", rows(1))
    assert asker.quiet(0.3) == []  # unsubscribed: nobody in this group answers


def test_stop_without_drain_answers_queued_requests_503(
    make_worker: WorkerFactory, asker: Asker
) -> None:
    worker, _calls = make_worker(delay_s=0.3, worker_threads=1)
    for i in range(3):
        asker.ask("dense", rows(1, seed=i))
    time.sleep(0.1)
    worker.stop(drain=False, timeout_s=2.0)
    replies = asker.collect(3, timeout_s=2.0)
    statuses = sorted(r.header.get("status", 200) for r in replies)
    assert statuses == [200, 503, 503]


def test_metrics_endpoint_serves_prometheus_text(make_worker: WorkerFactory, asker: Asker) -> None:
    import urllib.request

    from harness.broker import free_port

    worker, _ = make_worker(metrics_port=free_port())
    asker.ask("dense", rows(1))
    asker.collect(1)

    def scrape() -> str:
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        with urllib.request.urlopen(url) as response:
            return str(response.read().decode())

    # The worker thread counts the request answered just after publishing the reply, so
    # the reply can reach us a moment before the gauge drops back to 0.
    until = time.monotonic() + 5.0
    while "tether_cloud_inflight 0.0" not in (text := scrape()):
        assert time.monotonic() < until, text
        time.sleep(0.02)
    for name in (
        'tether_cloud_requests_total{model="dense",version="1"} 1.0',
        "tether_cloud_queue_seconds_bucket",
        "tether_cloud_compute_seconds_bucket",
        "tether_cloud_batch_size_bucket",
        "tether_cloud_inflight 0.0",
        "tether_cloud_model_ready",
    ):
        assert name in text


def test_a_reply_that_cannot_be_built_is_that_requests_500_and_the_next_is_served(
    make_worker: WorkerFactory, asker: Asker, mocker: MockerFixture
) -> None:
    """A bug while building one reply (injected: no model here produces one) answers that
    request with an error instead of leaving it to its deadline, and costs no other."""
    import cloud.worker

    real = cloud.worker.build_response
    calls: list[int] = []

    def first_breaks(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    mocker.patch.object(cloud.worker, "build_response", side_effect=first_breaks)
    worker, _ = make_worker()
    asker.ask("dense", rows(1))
    (failed,) = asker.collect(1)
    assert failed.kind == "error" and failed.header["status"] == 500
    assert "could not reply" in failed.header["error"]
    asker.ask("dense", rows(1))
    (ok,) = asker.collect(1)
    assert ok.kind == "infer_response" and len(calls) == 2
    assert worker.metrics.sample("tether_cloud_inflight") == 0
