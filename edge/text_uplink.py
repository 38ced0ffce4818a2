"""Cloud language and embedding models over the uplink: the text router's :class:`CloudText`.

A text request is a :class:`~shared.envelopes.TextRequestEnvelope` on the same topic, the
same connection and under the same rules as a V2 cloud request (edge/uplink.py): QoS 0
with a request id as correlation data and the deadline as message expiry, sent again
while no reply has come within ``attempt_timeout_s`` and the deadline allows (the cloud
worker runs a repeated request id once), and the uplink's circuit breaker in front.

A generation comes back as ordered chunks (:class:`~shared.envelopes.TextChunkEnvelope`):
:meth:`UplinkText.generate` returns once the first chunk is in, so a cloud that cannot
start the answer (unreachable, breaker open, no reply within the deadline, an error
reply) raises before any text, and the router can answer on the device instead. After
that, :class:`ChunkReassembler` puts chunks in ``seq`` order, drops duplicates and holds
early ones; the stream ends with the ``final`` chunk's usage and finish reason, or with an
error: the cloud's error reply, the broker connection lost, a gap that is not filled, or
no chunk for the route's timeout. It is never restarted, so no text is sent twice. A stream
left before its end (its client went away, or it broke) sends a
:class:`~shared.envelopes.TextCancelEnvelope`, so the cloud stops generating.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge.uplink import Uplink, cloud_error, outcome
from serving.runtimes.generation import (
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    Usage,
)
from shared import __version__
from shared.envelopes import (
    EmbedResponseEnvelope,
    Envelope,
    ErrorEnvelope,
    GenerationParams,
    TextCancelEnvelope,
    TextChunkEnvelope,
    TextRequestEnvelope,
    decode_envelope,
    frame,
)
from shared.errors import DeadlineExceeded, InternalError, TetherError, Unavailable
from shared.mqtt import Message
from shared.tracing import current_request_id

log = logging.getLogger(__name__)

#: Chunks a stream may run ahead of a missing one before the gap is an error.
REORDER_WINDOW = 64


class StreamBroken(Unavailable):
    """A cloud stream that started could not be completed (gap, stall or lost link)."""

    reason = "stream_broken"


class ChunkReassembler:
    """Puts a stream's chunks in ``seq`` order: duplicates dropped, early ones held, a gap
    wider than ``window`` an error; nothing is delivered after the ``final`` chunk."""

    def __init__(self, window: int = REORDER_WINDOW) -> None:
        self.window = window
        self.next_seq = 0
        self.finished = False
        self._early: dict[int, TextChunkEnvelope] = {}

    def add(self, chunk: TextChunkEnvelope) -> list[TextChunkEnvelope]:
        """The chunks that ``chunk`` makes deliverable, in order (often just it; none for a
        duplicate or an early chunk)."""
        if self.finished or chunk.seq < self.next_seq or chunk.seq in self._early:
            return []
        if chunk.seq >= self.next_seq + self.window:
            raise StreamBroken(
                f"the cloud stream lost chunk {self.next_seq} (chunk {chunk.seq} arrived)"
            )
        self._early[chunk.seq] = chunk
        ready: list[TextChunkEnvelope] = []
        while self.next_seq in self._early:
            next_chunk = self._early.pop(self.next_seq)
            self.next_seq += 1
            ready.append(next_chunk)
            if next_chunk.final:
                self.finished = True
                self._early.clear()
                break
        return ready

    @property
    def waiting(self) -> bool:
        """Whether chunks after a missing one are held (a gap)."""
        return bool(self._early)


@dataclass
class _Exchange:
    """One text request in flight: its replies arrive in ``inbox``."""

    model: str
    correlation: bytes
    inbox: queue.SimpleQueue[Message | TetherError]
    started: float


class UplinkText:
    """The cloud side of text routes, over the agent's :class:`~edge.uplink.Uplink`."""

    def __init__(self, uplink: Uplink) -> None:
        self.uplink = uplink

    # ------------------------------------------------------------------ generation

    def generate(
        self, model: str, request: GenerationRequest, timeout_s: float | None
    ) -> Iterator[GenerationEvent]:
        """Start a generation in the cloud; raises unless its first chunk comes in time."""
        timeout = timeout_s or self.uplink.settings.timeout_s
        generation = GenerationParams.model_validate(request.to_wire())
        exchange, first, _tail = self._start(model, "generate", timeout, generation=generation)
        if not isinstance(first, TextChunkEnvelope):
            self.uplink.unlisten(exchange.correlation)
            self.uplink.count(model, "error")
            raise InternalError(f"the cloud answered a generation with a {first.kind!r}")
        return _Stream(self._stream(exchange, first, timeout), lambda: self._cancel(exchange))

    def _cancel(self, exchange: _Exchange) -> None:
        """Stop listening, and ask the cloud to stop the generation (best effort)."""
        self.uplink.unlisten(exchange.correlation)
        cancel = TextCancelEnvelope(request_id=exchange.correlation.decode(), model=exchange.model)
        try:
            self.uplink.publish_request(
                exchange.model, frame(cancel.dump()), exchange.correlation, 10.0
            )
        except TetherError as exc:  # the broker is away: the cloud cannot send either
            log.debug("could not cancel a cloud generation: %s", exc.message)

    def _stream(
        self, exchange: _Exchange, first: TextChunkEnvelope, timeout_s: float
    ) -> Iterator[GenerationEvent]:
        model = exchange.model
        chunks = ChunkReassembler()
        ready = chunks.add(first)
        worker: str | None = None
        version: str | None = None
        result = "error"
        try:
            while True:
                for chunk in ready:
                    worker = chunk.worker or worker
                    version = chunk.model_version or version
                    if chunk.text:
                        yield TextDelta(chunk.text)
                    if chunk.final:
                        result = "ok"
                        yield _end(chunk, version, worker)
                        return
                ready = chunks.add(self._next_chunk(exchange, chunks, timeout_s))
        except GeneratorExit:
            if result != "ok":  # closed before its end (a client that went away)
                result = "cancelled"
            raise
        finally:
            self.uplink.unlisten(exchange.correlation)
            self.uplink.count(model, result)

    def _next_chunk(
        self, exchange: _Exchange, chunks: ChunkReassembler, timeout_s: float
    ) -> TextChunkEnvelope:
        try:
            item = exchange.inbox.get(timeout=timeout_s)
        except queue.Empty:
            gap = f" after a gap at chunk {chunks.next_seq}" if chunks.waiting else ""
            raise StreamBroken(
                f"the cloud stream of {exchange.model!r} stalled: no chunk for {timeout_s:g}s{gap}"
            ) from None
        if isinstance(item, TetherError):
            raise StreamBroken(f"the cloud stream of {exchange.model!r} broke: {item.message}")
        envelope, _tail = _decode(item)
        if not isinstance(envelope, TextChunkEnvelope):
            raise InternalError(f"the cloud sent a {envelope.kind!r} inside a text stream")
        return envelope

    # ------------------------------------------------------------------ embeddings

    def embed(
        self, model: str, texts: Sequence[str], timeout_s: float | None
    ) -> tuple[np.ndarray, int]:
        """Embed ``texts`` in the cloud: ``(vectors, prompt tokens)``."""
        timeout = timeout_s or self.uplink.settings.timeout_s
        exchange, reply, tail = self._start(model, "embed", timeout, texts=list(texts))
        self.uplink.unlisten(exchange.correlation)
        try:
            if not isinstance(reply, EmbedResponseEnvelope):
                raise InternalError(f"the cloud answered embeddings with a {reply.kind!r}")
            if reply.count != len(texts) or len(tail) != 4 * reply.count * reply.dimension:
                raise InternalError("the cloud sent embeddings of the wrong size")
        except TetherError:
            self.uplink.count(model, "error")
            raise
        vectors = np.frombuffer(tail, dtype="<f4").reshape(reply.count, reply.dimension)
        self.uplink.count(model, "ok")
        if self.uplink.metrics is not None:
            round_trip = time.monotonic() - exchange.started
            self.uplink.metrics.cloud_round_trip.labels(model).observe(round_trip)
        return vectors.astype(np.float32), reply.prompt_tokens

    # ------------------------------------------------------------------ the start

    def _start(
        self,
        model: str,
        task: str,
        timeout_s: float,
        *,
        generation: GenerationParams | None = None,
        texts: list[str] | None = None,
    ) -> tuple[_Exchange, Envelope, bytes]:
        """Send the request (again while unanswered) until its first reply: that reply; an
        error reply, a lost broker or the deadline raise (and tell the breaker)."""
        uplink = self.uplink
        started = time.monotonic()
        deadline = started + timeout_s
        request_id = uuid.uuid4().hex
        envelope = TextRequestEnvelope(
            request_id=request_id,
            model=model,
            task=task,
            deadline=time.time() + timeout_s,
            sent_at=time.time(),
            trace_id=current_request_id() or request_id,
            agent_version=__version__,
            generation=generation,
            texts=texts,
        )
        payload = frame(envelope.dump())
        exchange = _Exchange(model, request_id.encode(), queue.SimpleQueue(), started)
        try:
            uplink.breaker.acquire()
        except Unavailable:
            uplink.count(model, "rejected")
            raise
        try:
            uplink.listen(exchange.correlation, exchange.inbox.put)
        except BaseException:
            uplink.breaker.release()
            raise
        try:
            reply, tail = self._first_reply(exchange, payload, deadline)
        except TetherError as exc:
            uplink.unlisten(exchange.correlation)
            uplink.settle(exc)
            uplink.count(model, outcome(exc))
            raise
        except BaseException:
            uplink.unlisten(exchange.correlation)
            uplink.breaker.release()
            raise
        uplink.breaker.success()
        return exchange, reply, tail

    def _first_reply(
        self, exchange: _Exchange, payload: bytes, deadline: float
    ) -> tuple[Envelope, bytes]:
        settings = self.uplink.settings
        attempts = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _late(exchange.model, attempts)
            self.uplink.publish_request(exchange.model, payload, exchange.correlation, remaining)
            attempts += 1
            last = attempts >= settings.max_attempts
            wait = remaining if last else min(remaining, settings.attempt_timeout_s)
            try:
                item = exchange.inbox.get(timeout=wait)
            except queue.Empty:
                if last:
                    raise _late(exchange.model, attempts) from None
                log.info("no reply to text request for %s; sending it again", exchange.model)
                continue
            if isinstance(item, TetherError):
                raise item
            return _decode(item)


class _Stream(Iterator[GenerationEvent]):
    """A cloud generation's events. A stream left before its end (closed early, or broken:
    a stall, a gap) stops listening and asks the cloud to stop generating."""

    def __init__(self, events: Iterator[GenerationEvent], abandon: Callable[[], None]) -> None:
        self._events = events
        self._abandon = abandon
        self._open = True

    def __next__(self) -> GenerationEvent:
        try:
            event = next(self._events)
        except StopIteration:
            self._end(abandoned=False)
            raise
        except BaseException:
            self._end(abandoned=True)
            raise
        if isinstance(event, GenerationEnd):
            self._end(abandoned=False)
        return event

    def close(self) -> None:
        close = getattr(self._events, "close", None)
        if close is not None:
            close()
        self._end(abandoned=True)

    def _end(self, abandoned: bool) -> None:
        if self._open:
            self._open = False
            if abandoned:
                self._abandon()


def _late(model: str, attempts: int) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"cloud model {model!r} did not start answering within the deadline "
        f"({attempts} attempt{'s' if attempts != 1 else ''})"
    )


def _decode(message: Message) -> tuple[Envelope, bytes]:
    """A reply's envelope and binary tail; an error reply raises as the error it carries."""
    try:
        envelope, tail = decode_envelope(message.payload)
    except TetherError as exc:
        raise InternalError(f"cloud sent an unreadable reply: {exc.message}") from None
    if isinstance(envelope, ErrorEnvelope):
        error = cloud_error(envelope)
        error.reason = envelope.reason  # e.g. context_length_exceeded, for OpenAI's code
        raise error
    return envelope, bytes(tail)


def _end(chunk: TextChunkEnvelope, version: str | None, worker: str | None) -> GenerationEnd:
    if chunk.usage is None or chunk.finish_reason is None:
        raise InternalError("the cloud's final chunk has no usage or finish reason")
    usage = Usage(chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
    return GenerationEnd(chunk.finish_reason, usage, model_version=version, cloud_worker=worker)
