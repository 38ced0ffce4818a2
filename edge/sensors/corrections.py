"""Escalations the cloud could not take when they happened, sent once it is reachable again.

When a cascade answers a reading locally because the cloud could not be reached (route
``degraded``) and ``sensors.corrections`` is on, the reading's rows wait in the outbox.
This thread sends them, oldest first and :data:`GROUP` readings a request, through the
route's cloud runtime (the uplink) once the uplink is connected, with up to ``in_flight``
requests at once; the answers are stored in order, each as ``correction`` results for
the same reading ids in the transaction that removes the escalations. When the cloud
fails a request, the answers to later ones are not stored (they are asked again), so
corrections still leave in the order of their readings.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import orjson

from edge.sensors.outbox import Outbox, StoredEscalation
from edge.sensors.publisher import ResultPublisher
from edge.sensors.results import Outgoing, result_payload
from edge.uplink import Uplink
from serving.batching import batch_rows
from serving.dataplane import DataPlane
from serving.runtimes.base import Runtime
from shared.codec import DecodedRequest, decode_request
from shared.errors import TetherError

log = logging.getLogger(__name__)

#: Escalations (readings) sent to the cloud in one request.
GROUP = 64


@dataclass
class _Asked:
    """What the cloud said to one group: its corrections, or the error it failed with."""

    corrections: list[Outgoing]
    error: TetherError | None = None


class CorrectionSender:
    """The thread that turns stored escalations into correction results."""

    def __init__(
        self,
        dataplane: DataPlane,
        uplink: Uplink | None,
        outbox: Outbox,
        publisher: ResultPublisher,
        *,
        in_flight: int = 1,
        retry_s: float = 1.0,
    ) -> None:
        self.dataplane = dataplane
        self.uplink = uplink
        self.outbox = outbox
        self.publisher = publisher
        self.in_flight = in_flight
        self.retry_s = retry_s

    def run(self, stop: threading.Event) -> None:
        with ThreadPoolExecutor(self.in_flight, thread_name_prefix="sensors-correct") as pool:
            while not stop.is_set():
                if self.uplink is None or not self.uplink.connected:
                    stop.wait(0.2)
                    continue
                groups = groups_of(self.outbox.peek_escalations(GROUP * self.in_flight))
                if not groups:
                    stop.wait(0.2)
                    continue
                asked = [pool.submit(self.ask, group) for group in groups[: self.in_flight]]
                for group, future in zip(groups, asked, strict=False):
                    if not self.settle(group, future.result()):
                        for rest in asked:  # answers past a failure are asked again later
                            rest.result()
                        stop.wait(self.retry_s)
                        break

    def send(self, group: list[StoredEscalation]) -> bool:
        """Send one group (same model); True when it left the outbox either way."""
        return self.settle(group, self.ask(group))

    def ask(self, group: list[StoredEscalation]) -> _Asked:
        """The cloud's corrections for one group (same model), or why there are none.

        The group goes up in requests of at most the cloud model's batch of rows.
        """
        first = group[0].escalation
        corrections: list[Outgoing] = []
        try:
            late = self.dataplane.resolve_escalation(first.model, first.version)
            items = [
                (item, decode_request(item.escalation.request, item.escalation.header_length))
                for item in group
            ]
            for chunk in _by_rows(items, late.max_batch_size):
                corrections.extend(self._corrections(late, chunk))
        except TetherError as exc:
            return _Asked([], exc)
        return _Asked(corrections)

    def _corrections(
        self, late: Runtime, chunk: list[tuple[StoredEscalation, DecodedRequest]]
    ) -> list[Outgoing]:
        """One run of the route's cloud half for a chunk; a request the cloud refused fails
        the whole chunk (its error decides whether the group waits or is dropped)."""
        answers = self.dataplane.infer_batch(late, [request for _, request in chunk])
        corrections: list[Outgoing] = []
        for (item, _request), answer in zip(chunk, answers, strict=True):
            if isinstance(answer, TetherError):
                raise answer
            prediction = answer.prediction
            esc = item.escalation
            payload = result_payload(
                esc.model,
                prediction.model_version,
                prediction.outputs,
                prediction.provenance,
                orjson.loads(esc.identity),
                "correction",
            )
            corrections.append(
                Outgoing("correction", esc.topic, payload, esc.reading_id, esc.correlation)
            )
        return corrections

    def settle(self, group: list[StoredEscalation], asked: _Asked) -> bool:
        """Store a group's corrections (or drop it for a 4xx the cloud will always give it);
        False: the cloud is away or busy (5xx, or 429 from its per-device admission), and
        the group waits to be asked again."""
        seqs = [item.seq for item in group]
        if asked.error is not None:
            if asked.error.status >= 500 or asked.error.status == 429:
                log.info("corrections wait for the cloud: %s", asked.error.message)
                return False
            self.outbox.complete_escalations(
                seqs, (), reason=f"cloud_rejected:{asked.error.reason}"
            )
            return True
        self.outbox.complete_escalations(seqs, asked.corrections)
        self.publisher.wake()
        return True


def _by_rows(
    items: list[tuple[StoredEscalation, DecodedRequest]], max_rows: int
) -> list[list[tuple[StoredEscalation, DecodedRequest]]]:
    """Consecutive chunks of at most ``max_rows`` rows (any size when it is 0)."""
    chunks: list[list[tuple[StoredEscalation, DecodedRequest]]] = []
    rows = 0
    for item in items:
        n = batch_rows(item[1].inputs)
        if chunks and (max_rows <= 0 or rows + n <= max_rows):
            chunks[-1].append(item)
            rows += n
        else:
            chunks.append([item])
            rows = n
    return chunks


def groups_of(items: list[StoredEscalation]) -> list[list[StoredEscalation]]:
    """Consecutive groups of at most :data:`GROUP` escalations of one model (order kept)."""
    groups: list[list[StoredEscalation]] = []
    while items:
        group = same_model_prefix(items)[:GROUP]
        groups.append(group)
        items = items[len(group) :]
    return groups


def same_model_prefix(items: list[StoredEscalation]) -> list[StoredEscalation]:
    """The leading escalations that share the first one's model and version (order kept)."""
    key = (items[0].escalation.model, items[0].escalation.version)
    group: list[StoredEscalation] = []
    for item in items:
        if (item.escalation.model, item.escalation.version) != key:
            break
        group.append(item)
    return group
