"""Language and embedding models in the cloud worker: text requests from MQTT, streamed back.

A device's :class:`~shared.envelopes.TextRequestEnvelope` arrives on the same request topic
and shared subscription as tensor inference (``tether/cloud/infer/<device>/<model>``); the
worker's MQTT handler checks it as it checks a V2 request (reply address, duplicates by
request id, deadline, the device's admission share) and hands it here. The models are the
edge's own runtimes (llama.cpp for GGUF language models, ONNX Runtime for sentence
encoders), loaded from the worker's text repository.

Concurrency: ``text_threads`` threads take requests from one queue of at most
``text_queue_limit``; a request past that is answered 503 at once (the device's breaker and
routes handle it). A thread runs one generation from start to end, so at most
``text_threads`` generations run at once; each also needs a llama.cpp context of its model,
of which the model's config gives ``parameters.slots`` (further generations wait for one).

A generation is answered with ordered :class:`~shared.envelopes.TextChunkEnvelope` messages:
chunk 0 when it starts (its first token is ready), one chunk per piece of text, and a
``final`` chunk with the finish reason and the usage. A request that cannot
start is answered with one :class:`~shared.envelopes.ErrorEnvelope` (cached like a V2 error,
so a retry gets it again); a failure midway ends the stream with an ``ErrorEnvelope``.
Embeddings are one :class:`~shared.envelopes.EmbedResponseEnvelope`, cached for retries.
A :class:`~shared.envelopes.TextCancelEnvelope` from the same device stops a generation
(queued, or at its next token), freeing its thread and llama.cpp context.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from cloud.admission import Admitted
from cloud.dedupe import Key, ReplyAddress, ReplyCache
from cloud.metrics import CloudMetrics
from serving.repository import ModelRepository
from serving.runtimes.base import Runtime
from serving.runtimes.generation import (
    GenerationEnd,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    TextEmbedder,
    TextGenerator,
)
from shared.envelopes import (
    EmbedResponseEnvelope,
    ErrorEnvelope,
    TextChunkEnvelope,
    TextRequestEnvelope,
    TextUsage,
    frame,
)
from shared.errors import InternalError, InvalidInput, TetherError, Unavailable
from shared.tracing import bound_request_id

log = logging.getLogger(__name__)

#: Most texts one embeddings request may carry (OpenAI's own limit).
MAX_TEXTS = 2048
#: Statuses after which a retry of the same request id is run afresh (as for V2).
TRANSIENT_STATUSES = frozenset({429, 503})

#: ``send(address, payload, deadline)``: publish a reply (the worker's ``_send``); False
#: when it could not be handed to the broker connection.
Send = Callable[[ReplyAddress | None, bytes, float | None], bool]


class ReplyLost(Exception):
    """A chunk could not be sent (the broker is away): the stream is lost, stop generating."""


@dataclass
class TextJob:
    """A text request accepted from MQTT, waiting for a thread."""

    key: Key
    device: str
    envelope: TextRequestEnvelope
    runtime: Runtime
    address: ReplyAddress | None
    admitted: Admitted
    arrived: float
    deadline: float | None


class TextServing:
    """The cloud worker's text models: a bounded queue and the threads that serve it."""

    def __init__(
        self,
        worker_id: str,
        repository: ModelRepository,
        *,
        threads: int,
        queue_limit: int,
        metrics: CloudMetrics,
        replies: ReplyCache,
        send: Send,
        release: Callable[[Admitted], None],
        log_requests: bool = True,
    ) -> None:
        self.worker_id = worker_id
        self.repository = repository
        self.metrics = metrics
        self.replies = replies
        self.threads = threads
        self._send = send
        self._release = release
        self.log_requests = log_requests
        self._queue: queue.Queue[TextJob | None] = queue.Queue(maxsize=queue_limit)
        self._threads: list[threading.Thread] = []
        #: Requests queued or running, and those of them their device cancelled.
        self._active: set[Key] = set()
        self._cancelled: set[Key] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        for index in range(self.threads):
            thread = threading.Thread(target=self._serve, name=f"cloud-text-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, until: float, *, drain: bool = True) -> None:
        """With ``drain``, let the threads finish what is queued and running, until ``until``
        (monotonic); without, answer what is queued 503 at once and end running streams with
        a 503 error at their next token (waiting at most a second for that)."""
        if not drain:
            self._stopping = True
            until = min(until, time.monotonic() + 1.0)
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._fail_before_start(job, Unavailable("the cloud worker is stopping"))
                    self._done(job)
        for _ in self._threads:
            try:
                self._queue.put(None, timeout=max(0.0, until - time.monotonic()))
            except queue.Full:
                break
        for thread in self._threads:
            thread.join(timeout=max(0.0, until - time.monotonic()))

    def runtime(self, envelope: TextRequestEnvelope) -> Runtime:
        """The runtime for a text request; the wrong kind of model is a 400."""
        runtime = self.repository.get(envelope.model)
        if envelope.task == "generate":
            if not isinstance(runtime, TextGenerator):
                raise InvalidInput(f"the model {envelope.model!r} is not a language model")
            if envelope.generation is None:
                raise InvalidInput("a generate request needs its generation")
        else:
            if not isinstance(runtime, TextEmbedder):
                raise InvalidInput(f"the model {envelope.model!r} is not an embedding model")
            if not envelope.texts or len(envelope.texts) > MAX_TEXTS:
                raise InvalidInput(f"an embed request needs 1 to {MAX_TEXTS} texts")
        return runtime

    def put(self, job: TextJob) -> None:
        """Queue ``job``; a full queue is 503 (transient: a retry runs afresh)."""
        with self._lock:
            self._active.add(job.key)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._forget(job.key)
            raise Unavailable(
                f"the cloud worker has {self._queue.maxsize} text requests waiting"
            ) from None

    def cancel(self, key: Key) -> None:
        """Stop the generation ``key`` (queued or running) at its next token; unknown or
        finished ones are ignored."""
        with self._lock:
            if key in self._active:
                self._cancelled.add(key)

    def _forget(self, key: Key) -> None:
        with self._lock:
            self._active.discard(key)
            self._cancelled.discard(key)

    def _is_cancelled(self, key: Key) -> bool:
        return key in self._cancelled

    # ------------------------------------------------------------------ threads

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._stopping:
                    self._fail_before_start(job, Unavailable("the cloud worker is stopping"))
                elif self._is_cancelled(job.key):
                    self._stop_cancelled(job)
                elif job.deadline is not None and time.monotonic() > job.deadline:
                    log.info("dropped %s of %s: its deadline passed", job.key[1], job.device)
                    self.metrics.failures.labels(job.envelope.model, "expired").inc()
                    self.replies.finish(job.key, None, None)
                elif job.envelope.task == "generate":
                    self._generate(job)
                else:
                    self._embed(job)
            except Exception:  # a bug must not take a thread down
                log.exception("text request %s failed", job.key[1])
            finally:
                self._done(job)

    def _done(self, job: TextJob) -> None:
        """The request no longer occupies this worker (answered, failed or dropped)."""
        self._forget(job.key)
        self.metrics.inflight.dec()
        self._release(job.admitted)

    def _generate(self, job: TextJob) -> None:
        envelope = job.envelope
        runtime = job.runtime
        assert isinstance(runtime, TextGenerator) and envelope.generation is not None
        started = time.monotonic()
        self.metrics.queue_time.labels(envelope.model).observe(started - job.arrived)
        events: Iterator[GenerationEvent] = iter(())
        try:
            request = GenerationRequest.from_wire(envelope.generation.model_dump())
            events = runtime.generate(request)  # a request the model cannot take raises here
            # The stream starts with the first token: the wait for a llama.cpp context and
            # the prompt are inside the device's deadline for the start (a cloud that is
            # too busy to start in time is one the device can still answer for).
            first = next(events)
        except StopIteration:
            self._fail_before_start(job, InternalError(f"{envelope.model!r} generated nothing"))
            return
        except TetherError as exc:
            self._close(events)
            self._fail_before_start(job, exc)
            return
        except Exception as exc:
            log.exception("model %s failed", envelope.model)
            self._close(events)
            error = InternalError(f"model {envelope.model!r} failed: {type(exc).__name__}")
            self._fail_before_start(job, error)
            return
        seq = 0
        start = TextChunkEnvelope(
            request_id=envelope.request_id,
            seq=seq,
            worker=self.worker_id,
            model_version=runtime.version,
            queue_ms=round((started - job.arrived) * 1000.0, 3),
        )
        try:
            self._chunk(job, start)
            for event in itertools.chain([first], events):
                if self._is_cancelled(job.key):
                    self._stop_cancelled(job)
                    return
                if self._stopping:
                    raise Unavailable("the cloud worker is stopping")
                seq += 1
                if isinstance(event, TextDelta):
                    text = TextChunkEnvelope(
                        request_id=envelope.request_id, seq=seq, text=event.text
                    )
                    self._chunk(job, text)
                    continue
                self._finish(job, runtime, event, seq, started)
                return
            raise InternalError(f"the generation of {envelope.model!r} ended without its end")
        except ReplyLost:
            log.warning("generation %s stopped: its chunks cannot be sent", envelope.request_id)
            self.metrics.failures.labels(envelope.model, "reply_failed").inc()
            self.replies.finish(job.key, None, None)
        except TetherError as exc:
            self._fail_midway(job, exc)
        except Exception as exc:
            log.exception("model %s failed midway", envelope.model)
            self._fail_midway(
                job, InternalError(f"model {envelope.model!r} failed: {type(exc).__name__}")
            )
        finally:
            self._close(events)

    def _stop_cancelled(self, job: TextJob) -> None:
        log.info("generation %s cancelled by device %s", job.envelope.request_id, job.device)
        self.metrics.failures.labels(job.envelope.model, "cancelled").inc()
        self.replies.finish(job.key, None, None)

    @staticmethod
    def _close(events: Iterator[GenerationEvent]) -> None:
        """Stop a generation (frees its llama.cpp context)."""
        close = getattr(events, "close", None)
        if close is not None:
            close()

    def _finish(
        self, job: TextJob, runtime: Runtime, end: GenerationEnd, seq: int, started: float
    ) -> None:
        envelope = job.envelope
        usage = TextUsage(
            prompt_tokens=end.usage.prompt_tokens, completion_tokens=end.usage.completion_tokens
        )
        final = TextChunkEnvelope(
            request_id=envelope.request_id,
            seq=seq,
            final=True,
            finish_reason=end.finish_reason,
            usage=usage,
            worker=self.worker_id,
            model_version=runtime.version,
        )
        self._chunk(job, final)
        self.replies.finish(job.key, None, None)  # a late retry is dropped, not run again
        elapsed = time.monotonic() - started
        self.metrics.requests.labels(envelope.model, runtime.version).inc()
        self.metrics.compute_time.labels(envelope.model, runtime.version).observe(elapsed)
        if self.log_requests:
            with bound_request_id(envelope.trace_id or envelope.request_id):
                log.info(
                    "generated %d tokens with %s v%s for device %s in %.3f s (%s)",
                    usage.completion_tokens,
                    envelope.model,
                    runtime.version,
                    job.device,
                    elapsed,
                    end.finish_reason,
                )

    def _embed(self, job: TextJob) -> None:
        envelope = job.envelope
        runtime = job.runtime
        assert isinstance(runtime, TextEmbedder) and envelope.texts is not None
        started = time.monotonic()
        self.metrics.queue_time.labels(envelope.model).observe(started - job.arrived)
        try:
            vectors, tokens = runtime.embed(envelope.texts)
        except TetherError as exc:
            self._fail_before_start(job, exc)
            return
        except Exception as exc:
            log.exception("model %s failed", envelope.model)
            self._fail_before_start(
                job, InternalError(f"model {envelope.model!r} failed: {type(exc).__name__}")
            )
            return
        compute_s = time.monotonic() - started
        matrix = np.ascontiguousarray(vectors, dtype="<f4")
        reply = EmbedResponseEnvelope(
            request_id=envelope.request_id,
            count=int(matrix.shape[0]),
            dimension=int(matrix.shape[1]),
            prompt_tokens=tokens,
            worker=self.worker_id,
            model_version=runtime.version,
            queue_ms=round((started - job.arrived) * 1000.0, 3),
            compute_ms=round(compute_s * 1000.0, 3),
        )
        payload = frame(reply.dump(), [matrix.tobytes()])
        self.metrics.requests.labels(envelope.model, runtime.version).inc()
        self.metrics.compute_time.labels(envelope.model, runtime.version).observe(compute_s)
        for target in self.replies.finish(job.key, payload, job.address):
            self._send(target, payload, job.deadline)

    # ------------------------------------------------------------------ replies

    def _chunk(self, job: TextJob, chunk: TextChunkEnvelope) -> None:
        """Send one chunk; :class:`ReplyLost` when it cannot go out (nobody will see the
        rest of the stream: the device ends it with an error when its chunks stop)."""
        # No expiry: the device waits for the rest of a started stream past the deadline
        # of its start (it gives up on a stream that stalls, see edge/text_uplink.py).
        if not self._send(job.address, frame(chunk.dump()), None):
            raise ReplyLost

    def _fail_before_start(self, job: TextJob, exc: TetherError) -> None:
        """The request could not start: one error reply, cached for retries unless transient."""
        self.metrics.failures.labels(job.envelope.model, exc.reason).inc()
        payload = frame(ErrorEnvelope.from_error(job.envelope.request_id, exc).dump())
        if exc.status in TRANSIENT_STATUSES:
            self.replies.forget(job.key)
            self._send(job.address, payload, job.deadline)
            return
        for target in self.replies.finish(job.key, payload, job.address):
            self._send(target, payload, job.deadline)

    def _fail_midway(self, job: TextJob, exc: TetherError) -> None:
        """A started stream broke: it ends with an error (never restarted: no text twice)."""
        log.warning("generation %s broke midway: %s", job.envelope.request_id, exc.message)
        self.metrics.failures.labels(job.envelope.model, exc.reason).inc()
        self.replies.finish(job.key, None, None)
        payload = frame(ErrorEnvelope.from_error(job.envelope.request_id, exc).dump())
        self._send(job.address, payload, None)
