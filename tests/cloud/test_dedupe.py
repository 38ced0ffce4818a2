"""The reply cache: one run per request id, the same answer for every duplicate."""

from __future__ import annotations

from cloud.dedupe import Arrival, ReplyCache

A = ("replies/a", b"1")
B = ("replies/b", b"2")
KEY = ("dev", "r1")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_duplicate_while_running_is_dropped_and_new_addresses_share_the_answer() -> None:
    cache = ReplyCache(ttl_s=10, max_entries=10)
    assert cache.arrive(KEY, A) == (Arrival.NEW, None)
    assert cache.arrive(KEY, A) == (Arrival.DROP, None)
    assert cache.arrive(KEY, B) == (Arrival.DROP, None)
    assert cache.finish(KEY, b"answer", A) == [A, B]


def test_duplicate_after_the_answer_gets_the_cached_answer() -> None:
    cache = ReplyCache(ttl_s=10, max_entries=10)
    cache.arrive(KEY, A)
    cache.finish(KEY, b"answer", A)
    assert cache.arrive(KEY, A) == (Arrival.RESEND, b"answer")
    assert cache.arrive(KEY, None) == (Arrival.DROP, None)


def test_expired_requests_stay_unanswered() -> None:
    cache = ReplyCache(ttl_s=10, max_entries=10)
    cache.arrive(KEY, A)
    cache.finish(KEY, None, A)
    assert cache.arrive(KEY, A) == (Arrival.DROP, None)


def test_entries_expire_after_ttl_and_forget_allows_a_retry() -> None:
    clock = Clock()
    cache = ReplyCache(ttl_s=5, max_entries=10, clock=clock)
    cache.arrive(KEY, A)
    cache.finish(KEY, b"answer", A)
    clock.now = 6
    assert cache.arrive(KEY, A) == (Arrival.NEW, None)
    cache.forget(KEY)
    assert cache.arrive(KEY, A) == (Arrival.NEW, None)


def test_the_cache_is_bounded_and_evicted_entries_still_answer_their_first_address() -> None:
    cache = ReplyCache(ttl_s=100, max_entries=3)
    for i in range(10):
        cache.arrive(("dev", str(i)), A)
    assert len(cache) == 3
    assert cache.finish(("dev", "0"), b"x", A) == [A]
