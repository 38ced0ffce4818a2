"""Escalations the cloud could not take when they happened, sent once it is reachable again.

When a cascade answers a reading locally because the cloud could not be reached (route
``degraded``) and ``sensors.corrections`` is on, the reading's rows wait in the outbox.
This thread sends them, oldest first, through the route's cloud runtime (the uplink) once
the uplink is connected; the cloud's answer is stored as a ``correction`` result for the
same reading id in the same transaction that removes the escalation.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import orjson

from edge.dataplane import DataPlane
from edge.runtimes.base import Runtime
from edge.sensors.outbox import Outbox, StoredEscalation
from edge.sensors.publisher import ResultPublisher
from edge.sensors.results import Outgoing, result_payload
from edge.uplink import Uplink
from shared.codec import decode_request
from shared.errors import TetherError, Unavailable

log = logging.getLogger(__name__)

#: Escalations sent to the cloud in one request.
GROUP = 32


class CorrectionSender:
    """The thread that turns stored escalations into correction results."""

    def __init__(
        self,
        dataplane: DataPlane,
        uplink: Uplink | None,
        outbox: Outbox,
        publisher: ResultPublisher,
        *,
        retry_s: float = 1.0,
    ) -> None:
        self.dataplane = dataplane
        self.uplink = uplink
        self.outbox = outbox
        self.publisher = publisher
        self.retry_s = retry_s

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if self.uplink is None or not self.uplink.connected:
                stop.wait(0.2)
                continue
            items = self.outbox.peek_escalations(GROUP)
            if not items:
                stop.wait(0.2)
                continue
            group = same_model_prefix(items)
            if not self.send(group):
                stop.wait(self.retry_s)

    def send(self, group: list[StoredEscalation]) -> bool:
        """Send one group (same model); True when it left the outbox either way."""
        first = group[0].escalation
        seqs = [item.seq for item in group]
        try:
            runtime = self.dataplane.resolve(first.model, first.version)
            cloud = getattr(runtime, "cloud", None)
            if not isinstance(cloud, Runtime):
                raise Unavailable(f"model {first.model!r} has no cloud route any more")
            requests = [
                decode_request(i.escalation.request, i.escalation.header_length) for i in group
            ]
            names = list(requests[0].inputs)
            inputs = {n: np.concatenate([r.inputs[n] for r in requests]) for n in names}
            prediction = cloud.infer(inputs, None)
        except TetherError as exc:
            if exc.status >= 500:
                log.info("corrections wait for the cloud: %s", exc.message)
                return False
            self.outbox.complete_escalations(seqs, (), reason=f"cloud_rejected:{exc.reason}")
            return True
        corrections: list[Outgoing] = []
        start = 0
        for item, request in zip(group, requests, strict=True):
            rows = next(iter(request.inputs.values())).shape[0]
            outputs = {k: v[start : start + rows] for k, v in prediction.outputs.items()}
            start += rows
            params = dict(prediction.parameters)
            params.update(route="escalated", corrects="degraded")
            esc = item.escalation
            payload = result_payload(
                esc.model,
                prediction.model_version,
                outputs,
                params,
                orjson.loads(esc.identity),
                "correction",
            )
            corrections.append(
                Outgoing("correction", esc.topic, payload, esc.reading_id, esc.correlation)
            )
        self.outbox.complete_escalations(seqs, corrections)
        self.publisher.wake()
        return True


def same_model_prefix(items: list[StoredEscalation]) -> list[StoredEscalation]:
    """The leading escalations that share the first one's model and version (order kept)."""
    key = (items[0].escalation.model, items[0].escalation.version)
    group: list[StoredEscalation] = []
    for item in items:
        if (item.escalation.model, item.escalation.version) != key:
            break
        group.append(item)
    return group
