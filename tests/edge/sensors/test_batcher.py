"""Micro-batches close at N readings or T ms; the queue is bounded."""

from __future__ import annotations

import threading
import time

from edge.sensors.batcher import MicroBatcher
from edge.sensors.bindings import Binding
from edge.sensors.results import Reading
from shared.mqtt import Message

BINDING = Binding("t/+/data", "m", None, "t/{sensor}/r", "t/{sensor}/e", "auto", 1)


def reading(n: int) -> Reading:
    return Reading(
        message=Message(topic="t/s/data", payload=b"%d" % n), binding=BINDING, sensor="s"
    )


def test_batch_closes_at_max_messages() -> None:
    batcher = MicroBatcher("m", max_messages=4, max_delay_ms=1000, capacity=16)
    for n in range(10):
        batcher.put(reading(n))
    stop = threading.Event()
    started = time.monotonic()
    assert len(batcher.next_batch(stop)) == 4
    assert len(batcher.next_batch(stop)) == 4
    assert time.monotonic() - started < 0.5
    assert batcher.depth() == 2


def test_batch_closes_after_max_delay() -> None:
    batcher = MicroBatcher("m", max_messages=100, max_delay_ms=50, capacity=16)
    batcher.put(reading(1))
    batcher.put(reading(2))
    started = time.monotonic()
    assert len(batcher.next_batch(threading.Event())) == 2
    assert 0.04 <= time.monotonic() - started < 0.5
    assert batcher.next_batch(threading.Event(), idle_s=0.01) == []


def test_full_queue_blocks_until_stopped() -> None:
    batcher = MicroBatcher("m", max_messages=1, max_delay_ms=0, capacity=2)
    stop = threading.Event()
    assert batcher.put(reading(1), stop) and batcher.put(reading(2), stop)
    threading.Timer(0.2, stop.set).start()
    assert batcher.put(reading(3), stop) is False
    assert batcher.depth() == 2
