"""The dynamic batcher on its own: grouping, limits, delay, deadlines, closing."""

from __future__ import annotations

import threading
import time

import pytest

from cloud.batcher import Draining, DynamicBatcher, Overloaded, Queued
from cloud.settings import BatchPolicy


def batcher(size: int = 0, delay_ms: float = 0, limit: int = 100) -> DynamicBatcher[str]:
    policy = BatchPolicy(max_batch_size=size, max_queue_delay_ms=delay_ms)
    return DynamicBatcher(lambda _model: policy, limit)


def job(name: str, model: str = "m", key: object = "k", rows: int = 1, **kw: float) -> Queued[str]:
    return Queued(name, model, key, rows, time.monotonic(), **kw)  # type: ignore[arg-type]


def names(b: DynamicBatcher[str]) -> list[str]:
    batch = b.take()
    assert batch is not None
    return [j.item for j in batch.jobs]


def test_off_by_default_every_request_alone_in_arrival_order() -> None:
    b = batcher()
    for name in "abc":
        b.put(job(name))
    assert [names(b) for _ in range(3)] == [["a"], ["b"], ["c"]]


def test_compatible_requests_join_up_to_max_rows() -> None:
    b = batcher(size=4)
    b.put(job("a", rows=2))
    b.put(job("x", key="other"))
    b.put(job("b", rows=1))
    b.put(job("c", rows=2))
    b.put(job("d", rows=1))
    b.put(job("n", key=None))
    assert names(b) == ["a", "b", "d"]
    assert names(b) == ["x"]
    assert names(b) == ["c"]
    assert names(b) == ["n"]


def test_a_short_batch_waits_for_the_queue_delay() -> None:
    b = batcher(size=4, delay_ms=300)
    b.put(job("a"))
    threading.Timer(0.1, lambda: b.put(job("b"))).start()
    started = time.monotonic()
    assert names(b) == ["a", "b"]
    assert 0.25 <= time.monotonic() - started < 1.0


def test_models_are_served_oldest_first() -> None:
    b = batcher(size=4)
    b.put(job("a1", model="a"))
    b.put(job("b1", model="b"))
    b.put(job("a2", model="a"))
    assert names(b) == ["a1", "a2"]
    assert names(b) == ["b1"]


def test_expired_requests_are_handed_back_not_run() -> None:
    b = batcher()
    b.put(job("late", deadline=time.monotonic() - 1))
    b.put(job("ok"))
    batch = b.take()
    assert batch is not None and [j.item for j in batch.expired] == ["late"] and not batch.jobs
    assert names(b) == ["ok"]


def test_full_and_closed_queues_refuse() -> None:
    b = batcher(limit=1)
    b.put(job("a"))
    with pytest.raises(Overloaded) as exc:
        b.put(job("b"))
    assert exc.value.status == 503 and exc.value.reason == "overloaded"
    b.close()
    with pytest.raises(Draining):
        b.put(job("c"))
    assert names(b) == ["a"]  # queued work is still handed out
    assert b.take() is None


def test_close_ends_the_queue_delay_and_discard_empties() -> None:
    b = batcher(size=4, delay_ms=5000)
    b.put(job("a"))
    threading.Timer(0.1, b.close).start()
    started = time.monotonic()
    assert names(b) == ["a"]
    assert time.monotonic() - started < 1.0
    b2 = batcher()
    b2.put(job("a"))
    assert [j.item for j in b2.discard()] == ["a"]
    assert b2.take() is None
