"""One micro-batch through the data plane: decode, infer, and the messages that answer it.

:meth:`BatchProcessor.answer` gives every reading of a batch exactly one message (its
result or its error message) plus the escalations a degraded cascade leaves for later;
the bridge stores them in the outbox in the transaction that takes the readings out of
the intake. Nothing one reading does reaches its neighbours: a reading that fails to
decode, breaks the identity rule (edge/sensors/identity.py), makes its batch's inference
fail or its result unencodable gets an error message for itself alone, and an exception
nobody expected costs the reading an ``internal`` error message, never the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from edge.sensor_settings import SensorSettings
from edge.sensors.identity import Fields, best_effort_fields, identify
from edge.sensors.metrics import SensorMetrics
from edge.sensors.outbox import Escalation
from edge.sensors.payloads import ModelInputs, decode_payload, model_inputs
from edge.sensors.results import (
    Outgoing,
    Reading,
    error_message,
    last_resort_error,
    result_message,
)
from serving.batching import stack_requests
from serving.dataplane import DataPlane
from serving.runtimes.base import Runtime
from shared.codec import encode_request
from shared.errors import InternalError, InvalidInput, TetherError

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """The messages that answer one batch: one per reading, and escalations for later."""

    outgoing: list[Outgoing] = field(default_factory=list)
    escalations: list[Escalation] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(1 for o in self.outgoing if o.kind == "error")

    @property
    def results(self) -> int:
        return len(self.outgoing) - self.errors


class BatchProcessor:
    """Answers micro-batches of one model through the data plane."""

    def __init__(
        self, dataplane: DataPlane, metrics: SensorMetrics, settings: SensorSettings, device: str
    ) -> None:
        self.dataplane = dataplane
        self.metrics = metrics
        self.settings = settings
        self.device = device

    def answer(self, batch: Sequence[Reading]) -> Answer:
        """One message per reading of ``batch`` (same model), never raising for a reading."""
        answer = Answer()
        if not batch:
            return answer
        binding = batch[0].binding
        self.metrics.batch_size.labels(binding.model).observe(len(batch))
        try:
            runtime = self.dataplane.resolve_for_request(binding.model, binding.version)
            shape = model_inputs(runtime.inputs, runtime.max_batch_size)
        except Exception as exc:
            answer.outgoing.extend(self.failed(reading, exc) for reading in batch)
            return answer
        ready: list[Reading] = []
        for reading in batch:
            try:
                self._decode(reading, shape)
            except Exception as exc:
                answer.outgoing.append(self.failed(reading, exc))
                continue
            ready.append(reading)
        for chunk in _chunks(ready, runtime.max_batch_size):
            self._run(chunk, runtime, answer)
        return answer

    def failed(self, reading: Reading, exc: BaseException) -> Outgoing:
        """The error message of a reading whose handling raised ``exc``."""
        if not reading.reading_id:
            self._identify(reading, None)
        return self._error(reading, _tether_error(exc))

    # ------------------------------------------------------------------ steps

    def _decode(self, reading: Reading, shape: ModelInputs) -> None:
        message = reading.message
        try:
            reading.decoded = decode_payload(
                message.payload,
                shape,
                content_type=message.content_type,
                fmt=reading.binding.format,
                max_bytes=self.settings.max_payload_bytes,
            )
        except TetherError:
            oversize = len(message.payload) > self.settings.max_payload_bytes
            self._identify(reading, None if oversize else best_effort_fields(message.payload))
            raise
        self._identify(reading, reading.decoded.fields)
        if reading.problem is not None:
            raise InvalidInput(reading.problem)

    def _identify(self, reading: Reading, fields: Fields | None) -> None:
        identity = identify(reading.message, fields)
        reading.reading_id, reading.id_source = identity.reading_id, identity.source
        reading.seq, reading.timestamp = identity.seq, identity.timestamp
        reading.problem = identity.problem

    def _error(self, reading: Reading, exc: TetherError) -> Outgoing:
        self.metrics.errors.labels(reading.binding.model, exc.reason).inc()
        try:
            return error_message(reading, exc, device=self.device)
        except Exception:
            log.exception("error message for reading %r failed", reading.reading_id)
            return last_resort_error(reading, exc, device=self.device)

    def _run(self, chunk: list[Reading], runtime: Runtime, answer: Answer) -> None:
        binding = chunk[0].binding
        requests = [r.decoded.request for r in chunk if r.decoded is not None]
        try:
            request = stack_requests(requests) if len(requests) > 1 else requests[0]
            prediction = self.dataplane.infer(
                binding.model, binding.version, request, runtime=runtime
            )
        except Exception as exc:
            if len(chunk) > 1:  # find the reading at fault; the others still get answers
                for reading in chunk:
                    self._run([reading], runtime, answer)
                return
            if not isinstance(exc, TetherError):
                log.exception("model %s failed on reading %r", binding.model, chunk[0].reading_id)
            answer.outgoing.append(self._error(chunk[0], _tether_error(exc)))
            return
        start = 0
        for reading in chunk:
            assert reading.decoded is not None
            stop = start + reading.decoded.rows
            try:
                outputs = {name: array[start:stop] for name, array in prediction.outputs.items()}
                share = prediction.provenance.rows(start, stop)
                version = share.model_version or prediction.model_version
                result = result_message(
                    reading, binding.model, outputs, share, version, device=self.device
                )
                degraded = share.route == "degraded"
                escalation = (
                    self._escalation(reading) if degraded and self.settings.corrections else None
                )
            except Exception as exc:
                log.exception("result of reading %r failed", reading.reading_id)
                answer.outgoing.append(self._error(reading, _tether_error(exc)))
                continue
            finally:
                start = stop
            answer.outgoing.append(result)
            if degraded:
                self.metrics.degraded.labels(binding.model).inc()
            if escalation is not None:
                answer.escalations.append(escalation)

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


def _tether_error(exc: BaseException) -> TetherError:
    """``exc`` as the Tether error an error message reports (unexpected ones: internal)."""
    if isinstance(exc, TetherError):
        return exc
    return InternalError(f"{type(exc).__name__} while handling the reading")


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
