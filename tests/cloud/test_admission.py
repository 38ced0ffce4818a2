"""Per-device admission: one device past its share of a cloud worker gets 429 replies while
other devices are served (a real Mosquitto, real ONNX Runtime)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from cloud.admission import DeviceAdmission
from cloud.settings import AdmissionSettings
from harness.broker import Broker
from shared.errors import TooManyRequests
from tests.cloud.conftest import Asker, WorkerFactory


def rows(n: int, features: int = 4) -> np.ndarray:
    return np.ones((n, features), dtype=np.float32)


@pytest.fixture
def second_device(broker: Broker) -> Iterator[Asker]:
    instance = Asker(broker, device="dev2")
    yield instance
    instance.close()


def test_a_device_past_its_share_gets_429_and_another_device_is_served(
    make_worker: WorkerFactory, asker: Asker, second_device: Asker
) -> None:
    # each run takes 1.5 s on one of two threads: dev1's first request is still running
    # while its next three arrive, and dev2's request finds the other thread free
    worker, calls = make_worker(
        delay_s=1.5, worker_threads=2, admission={"max_requests_per_device": 1}
    )
    first = asker.ask("dense", rows(1))
    refused = [asker.ask("dense", rows(1)) for _ in range(3)]
    other = second_device.ask("dense", rows(1))
    (served,) = second_device.collect(1, timeout_s=10)
    assert served.kind == "infer_response" and served.header["request_id"] == other
    replies = {r.header["request_id"]: r for r in asker.collect(4, timeout_s=10)}
    assert replies[first].kind == "infer_response"
    for request_id in refused:
        header = replies[request_id].header
        assert (header["kind"], header["status"], header["reason"]) == (
            "error",
            429,
            "rate_limited",
        )
        assert "dev1" in header["error"] and "in flight" in header["error"]
    assert calls.rows == [1, 1]
    assert (
        worker.metrics.sample("tether_cloud_failures_total", model="dense", reason="rate_limited")
        == 3
    )
    # answered, dev1's request stops counting: the next one is served
    again = asker.ask("dense", rows(1))
    (reply,) = asker.collect(1, timeout_s=10)
    assert reply.kind == "infer_response" and reply.header["request_id"] == again
    # released before the reply left
    assert worker.admission.in_flight("dev1") == (0, 0)


def test_bytes_in_flight_are_bounded_per_device() -> None:
    admission = DeviceAdmission(
        AdmissionSettings(max_requests_per_device=10, max_bytes_per_device=1000)
    )
    big = admission.admit("a", 1500)  # alone, a request larger than the bound is taken
    with pytest.raises(TooManyRequests, match="1500 bytes of requests in flight"):
        admission.admit("a", 1)
    other = admission.admit("b", 900)  # another device has its own bound
    admission.release(big)
    small = admission.admit("a", 600)
    with pytest.raises(TooManyRequests, match="its limit of 1000"):
        admission.admit("a", 500)
    admission.release(small)
    admission.release(other)
    assert admission.in_flight("a") == admission.in_flight("b") == (0, 0)
    assert not admission._usage  # devices with nothing in flight are forgotten
