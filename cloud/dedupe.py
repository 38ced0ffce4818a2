"""Run each request once, although it may arrive more than once.

The edge uplink publishes a request again (same request id, reply topic and correlation
data) when no reply came within its attempt timeout, since a request or a reply sent at
QoS 0 can be lost; and a requester that uses QoS 1 gets redeliveries when the broker
misses a PUBACK. The :class:`ReplyCache`
remembers each request, keyed by ``(device, request_id)`` with the device taken from the
topic, from its arrival until ``ttl_s`` after its answer:

* a duplicate that arrives while the request is queued or running is dropped; its reply
  address is added to the request's, so every address gets the one answer when it is
  ready (an address already known gets it once);
* a duplicate that arrives after the answer gets the *same answer bytes* again, from the
  cache, without running the model again. A retry means the asker did not see the first
  answer (its reply was lost, or the request and the reply crossed); answering from the
  cache keeps the promise that matters, one run per request, while never leaving a retry
  unanswered. The edge uplink drops any reply whose correlation id is no longer pending,
  so a second copy of an answer is harmless;
* a request dropped because its deadline passed is remembered without an answer, so its
  duplicates are dropped too.

The cache is bounded (``max_entries``) and per worker: a redelivery that the broker routes
to another worker of the share group is not caught here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

Key = tuple[str, str]


class ReplyAddress(NamedTuple):
    """Where to answer a request: its response topic and correlation data, and the QoS
    the request arrived with (the answer goes back at the same QoS)."""

    topic: str
    correlation: bytes | None
    qos: int = 0


class Arrival(Enum):
    """What to do with a request that just arrived."""

    NEW = "new"  #: first time seen: run it
    DROP = "dropped"  #: a duplicate of a request still running, or expired: do nothing
    RESEND = "resent"  #: a duplicate of a request already answered: re-send the answer


@dataclass
class _Entry:
    addresses: list[ReplyAddress] = field(default_factory=list)
    done: bool = False
    reply: bytes | None = None
    finished_at: float = 0.0


class ReplyCache:
    """A bounded, time-limited memory of request ids and the answers sent for them."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def arrive(self, key: Key, address: ReplyAddress | None) -> tuple[Arrival, bytes | None]:
        """Record an arrival; returns what to do and, for ``RESEND``, the cached answer."""
        with self._lock:
            self._purge()
            entry = self._entries.get(key)
            if entry is None:
                self._entries[key] = _Entry(addresses=[address] if address else [])
                return Arrival.NEW, None
            if not entry.done:
                if address is not None and address not in entry.addresses:
                    entry.addresses.append(address)  # answered with the first address
                return Arrival.DROP, None
            if address is None or entry.reply is None:
                return Arrival.DROP, None  # nowhere to answer, or expired unanswered
            return Arrival.RESEND, entry.reply

    def finish(
        self, key: Key, reply: bytes | None, first: ReplyAddress | None
    ) -> list[ReplyAddress]:
        """Remember the answer to ``key``; returns every address that must receive it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:  # evicted while running: answer the first address only
                return [first] if first is not None else []
            entry.done, entry.reply, entry.finished_at = True, reply, self._clock()
            self._entries.move_to_end(key)
            return list(entry.addresses)

    def forget(self, key: Key) -> None:
        """Drop ``key`` so that a retry is run afresh (after a transient failure)."""
        with self._lock:
            self._entries.pop(key, None)

    def _purge(self) -> None:
        now = self._clock()
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            stale = entry.done and now - entry.finished_at >= self.ttl_s
            if not stale and len(entries) < self.max_entries:
                break
            del entries[key]
