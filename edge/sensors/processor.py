"""One micro-batch through the data plane: decode, infer, store, then acknowledge.

The order is what makes the bridge lose nothing: a batch's results (and error messages,
and the escalations a degraded cascade leaves for later) are stored in the outbox in one
durable transaction, and only then are the batch's MQTT messages acknowledged. A message
the broker redelivers after a crash in between (DUP flag set) whose reading was already
stored is acknowledged without being answered again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from edge.dataplane import DataPlane
from edge.runtimes.base import Runtime
from edge.sensors.metrics import SensorMetrics
from edge.sensors.outbox import Escalation, Outbox
from edge.sensors.payloads import (
    DecodedReading,
    best_effort_fields,
    decode_payload,
    message_timestamp,
    model_inputs,
    reading_id,
)
from edge.sensors.results import Outgoing, Reading, error_message, result_message, split_rows
from edge.sensors.settings import SensorSettings
from shared.codec import DecodedRequest, encode_request
from shared.errors import InternalError, InvalidInput, TetherError

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    """What one batch produced (for tests and the benchmark)."""

    results: int = 0
    errors: int = 0
    skipped: int = 0
    escalations: int = 0


class BatchProcessor:
    """Runs micro-batches of one model through the data plane into the outbox."""

    def __init__(
        self,
        dataplane: DataPlane,
        outbox: Outbox,
        metrics: SensorMetrics,
        settings: SensorSettings,
        device: str,
    ) -> None:
        self.dataplane = dataplane
        self.outbox = outbox
        self.metrics = metrics
        self.settings = settings
        self.device = device

    def process(self, batch: Sequence[Reading]) -> BatchOutcome:
        """Answer a batch (same model) durably, then acknowledge its messages."""
        outcome = BatchOutcome()
        if not batch:
            return outcome
        binding = batch[0].binding
        self.metrics.batch_size.labels(binding.model).observe(len(batch))
        outgoing: list[Outgoing] = []
        escalations: list[Escalation] = []
        runtime: Runtime | None = None
        try:
            runtime = self.dataplane.resolve(binding.model, binding.version)
        except TetherError as exc:
            for reading in batch:
                self._identify(reading, None)
                outgoing.append(self._error(reading, exc))
        fresh: list[Reading] = []
        if runtime is not None:
            shape = model_inputs(runtime.inputs, runtime.max_batch_size)
            for reading in batch:
                message = reading.message
                try:
                    reading.decoded = decode_payload(
                        message.payload,
                        shape,
                        content_type=message.content_type,
                        fmt=binding.format,
                        max_bytes=self.settings.max_payload_bytes,
                    )
                except TetherError as exc:
                    self._identify(reading, None)
                    if not self._already_answered(reading):
                        outgoing.append(self._error(reading, exc))
                    else:
                        outcome.skipped += 1
                    continue
                self._identify(reading, reading.decoded)
                if self._already_answered(reading):
                    outcome.skipped += 1
                else:
                    fresh.append(reading)
            for chunk in _chunks(fresh, runtime.max_batch_size):
                self._run(chunk, runtime, outgoing, escalations)
        outcome.errors = sum(1 for o in outgoing if o.kind == "error")
        outcome.results = len(outgoing) - outcome.errors
        outcome.escalations = len(escalations)
        keys = [r.key for r in batch if r.reading_id]
        self.outbox.store(outgoing, escalations, keys)
        for reading in batch:
            reading.message.ack()
        if outcome.skipped:
            self.metrics.redeliveries.inc(outcome.skipped)
        return outcome

    # ------------------------------------------------------------------ steps

    def _identify(self, reading: Reading, decoded: DecodedReading | None) -> None:
        fields = decoded.fields if decoded is not None else best_effort_fields(reading.message)
        reading.reading_id, reading.id_source = reading_id(reading.message, fields)
        reading.timestamp = message_timestamp(reading.message, fields)
        if fields is not None:
            reading.seq = fields.seq

    def _already_answered(self, reading: Reading) -> bool:
        """A redelivered message whose reading the outbox already holds an answer for."""
        return reading.message.dup and self.outbox.seen(reading.key)

    def _error(self, reading: Reading, exc: TetherError) -> Outgoing:
        self.metrics.errors.labels(reading.binding.model, exc.reason).inc()
        return error_message(reading, exc, device=self.device)

    def _run(
        self,
        chunk: list[Reading],
        runtime: Runtime,
        outgoing: list[Outgoing],
        escalations: list[Escalation],
    ) -> None:
        binding = chunk[0].binding
        requests = [r.decoded.request for r in chunk if r.decoded is not None]
        try:
            request = _concat(requests) if len(requests) > 1 else requests[0]
            prediction = self.dataplane.infer(binding.model, binding.version, request)
        except TetherError as exc:
            if len(chunk) > 1:  # find the reading at fault; the others still get answers
                for reading in chunk:
                    self._run([reading], runtime, outgoing, escalations)
                return
            outgoing.append(self._error(chunk[0], exc))
            return
        except Exception as exc:
            log.exception("model %s failed on a batch of %d", binding.model, len(chunk))
            for reading in chunk:
                outgoing.append(self._error(reading, InternalError(f"{type(exc).__name__}: {exc}")))
            return
        local = getattr(runtime, "local", None)
        local_id = (local.name, local.version) if isinstance(local, Runtime) else None
        total = sum(r.decoded.rows for r in chunk if r.decoded is not None)
        start = 0
        for reading in chunk:
            assert reading.decoded is not None
            stop = start + reading.decoded.rows
            outputs, params, version = split_rows(prediction, start, stop, total, local_id)
            start = stop
            outgoing.append(
                result_message(reading, binding.model, outputs, params, version, device=self.device)
            )
            if params.get("route") == "degraded":
                self.metrics.degraded.labels(binding.model).inc()
                if self.settings.corrections:
                    escalations.append(self._escalation(reading))

    def _escalation(self, reading: Reading) -> Escalation:
        assert reading.decoded is not None
        body, header_length = encode_request(
            reading.decoded.request.inputs, reading.decoded.request.datatypes
        )
        binding = reading.binding
        return Escalation(
            model=binding.model,
            version=binding.version,
            topic=binding.results_topic(self.device, reading.sensor),
            identity=orjson.dumps(reading.identity()),
            request=body,
            header_length=header_length,
            reading_id=reading.reading_id,
            correlation=reading.message.correlation_data,
        )


def _chunks(readings: list[Reading], max_rows: int) -> list[list[Reading]]:
    """Consecutive groups whose rows fit the model's batch (one reading each if it has none)."""
    if max_rows <= 0:
        return [[r] for r in readings]
    chunks: list[list[Reading]] = []
    current: list[Reading] = []
    rows = 0
    for reading in readings:
        n = reading.decoded.rows if reading.decoded is not None else 1
        if current and rows + n > max_rows:
            chunks.append(current)
            current, rows = [], 0
        current.append(reading)
        rows += n
    if current:
        chunks.append(current)
    return chunks


def _concat(requests: list[DecodedRequest]) -> DecodedRequest:
    """One request whose inputs are the requests' inputs stacked along the batch."""
    first = requests[0]
    names = list(first.inputs)
    for other in requests[1:]:
        if list(other.inputs) != names or other.datatypes != first.datatypes:
            raise InvalidInput("readings of one batch differ in inputs or datatypes")
    try:
        inputs = {name: np.concatenate([r.inputs[name] for r in requests]) for name in names}
    except ValueError as exc:
        raise InvalidInput(f"readings of one batch differ in shape: {exc}") from None
    return DecodedRequest(inputs=inputs, datatypes=dict(first.datatypes))
