"""The OpenAI serving layer: validated requests in, OpenAI answers (or SSE chunks) out.

Between the thin routes (``edge/openai/routes.py``) and the :class:`~edge.text_router.TextRouter`:
it turns a :mod:`~edge.openai.protocol` request into a generation, starts it through the
router (so routing errors and a prompt over the context are ordinary HTTP errors, raised
before any byte is sent), and renders the answer. A stream yields Server-Sent Events:
one ``chat.completion.chunk`` per piece of text, a final chunk with the finish reason, the
usage chunk when ``stream_options.include_usage`` asks for it, and ``data: [DONE]``. An
error after the stream started is sent as one ``data: {"error": ...}`` event, and the
stream ends there. It also records the text metrics (time to first token, tokens per
second, tokens) per model and ``served_by``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from edge.openai import protocol
from edge.openai.errors import error_body
from edge.openai.metrics import TextMetrics
from edge.text_router import TextRouter
from serving.provenance import Provenance
from serving.runtimes.generation import GenerationEnd, TextDelta, TextStream, collect
from shared.errors import InternalError, TetherError

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying ``payload`` as JSON."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class Answer:
    """What a route sends: a JSON body, or an SSE stream; and the provenance headers."""

    body: dict[str, Any] | None
    stream: Iterator[bytes] | None
    provenance: Provenance


class OpenAIServing:
    """Answers the OpenAI endpoints over a text router."""

    def __init__(self, router: TextRouter, metrics: TextMetrics) -> None:
        self.router = router
        self.metrics = metrics
        self.created = int(time.time())

    # ------------------------------------------------------------------ models

    def list_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._card(m.name) for m in self.router.models()]}

    def get_model(self, name: str) -> dict[str, Any]:
        return self._card(name)

    def _card(self, name: str) -> dict[str, Any]:
        model = self.router.model(name)
        return protocol.model_card(
            model.name, model.owned_by, self.created, {"task": model.task, "route": model.route}
        )

    # ------------------------------------------------------------------ generation

    def chat(self, body: Any) -> Answer:
        request: protocol.ChatCompletionRequest = protocol.parse(
            protocol.ChatCompletionRequest, body
        )
        return self._generate(request, "chat", request.generation())

    def completion(self, body: Any) -> Answer:
        request: protocol.CompletionRequest = protocol.parse(protocol.CompletionRequest, body)
        return self._generate(request, "completion", request.generation())

    def _generate(self, request: Any, endpoint: str, generation: Any) -> Answer:
        started = time.perf_counter()
        try:
            stream = self.router.generate(request.model, generation)
        except TetherError as exc:
            self.metrics.failures.labels(request.model, endpoint, exc.reason).inc()
            raise
        timed = self._timed(stream, request.model, endpoint, started)
        if request.stream:
            render = self._chat_events if endpoint == "chat" else self._completion_events
            return Answer(None, render(request, stream, timed), stream.provenance)
        try:
            result = collect(timed)
        finally:
            stream.close()
        provenance = stream.finished(result.end)
        params = provenance.parameters()
        if endpoint == "chat":
            body = protocol.chat_completion(
                protocol.new_id("chatcmpl"),
                request.model,
                result.text,
                result.end.finish_reason,
                result.end.usage,
                params,
            )
        else:
            body = protocol.text_completion(
                protocol.new_id("cmpl"),
                int(time.time()),
                request.model,
                result.text,
                result.end.finish_reason,
                params,
                result.end.usage,
            )
        return Answer(body, None, provenance)

    def _timed(
        self, stream: TextStream, model: str, endpoint: str, started: float
    ) -> Iterator[TextDelta | GenerationEnd]:
        """The stream's events, with the time to first token and tokens/s recorded."""
        served_by = stream.provenance.served_by
        first: float | None = None
        try:
            for event in stream.events:
                if isinstance(event, TextDelta):
                    if first is None:
                        first = time.perf_counter()
                        self.metrics.time_to_first_token.labels(model, served_by).observe(
                            first - started
                        )
                    yield event
                    continue
                usage = event.usage
                self.metrics.prompt_tokens.labels(model, served_by).inc(usage.prompt_tokens)
                self.metrics.completion_tokens.labels(model, served_by).inc(usage.completion_tokens)
                if first is not None and usage.completion_tokens > 1:
                    elapsed = time.perf_counter() - first
                    if elapsed > 0:
                        rate = (usage.completion_tokens - 1) / elapsed
                        self.metrics.tokens_per_second.labels(model, served_by).observe(rate)
                route = stream.provenance.route or "local"
                self.metrics.requests.labels(model, endpoint, served_by, route).inc()
                yield event
                return
        except TetherError as exc:
            self.metrics.failures.labels(model, endpoint, exc.reason).inc()
            raise
        raise InternalError(f"the generation of {model!r} ended without its final event")

    def _chat_events(
        self,
        request: protocol.ChatCompletionRequest,
        stream: TextStream,
        events: Iterator[TextDelta | GenerationEnd],
    ) -> Iterator[bytes]:
        completion_id = protocol.new_id("chatcmpl")
        created = int(time.time())
        params = stream.provenance.parameters()
        model = request.model
        try:
            yield sse(
                protocol.chat_chunk(
                    completion_id,
                    created,
                    model,
                    {"role": "assistant", "content": ""},
                    None,
                    params,
                )
            )
            for event in events:
                if isinstance(event, TextDelta):
                    delta = {"content": event.text}
                    yield sse(
                        protocol.chat_chunk(completion_id, created, model, delta, None, params)
                    )
                    continue
                yield sse(
                    protocol.chat_chunk(
                        completion_id, created, model, {}, event.finish_reason, params
                    )
                )
                if request.include_usage:
                    yield sse(
                        protocol.chat_chunk(
                            completion_id, created, model, None, None, params, event.usage
                        )
                    )
            yield DONE
        except TetherError as exc:
            log.warning("stream of %s broke: %s", model, exc.message)
            yield sse(error_body(exc))
        except Exception as exc:
            log.exception("stream of %s failed", model)
            yield sse(error_body(InternalError(f"internal error: {type(exc).__name__}")))
        finally:
            stream.close()

    def _completion_events(
        self,
        request: protocol.CompletionRequest,
        stream: TextStream,
        events: Iterator[TextDelta | GenerationEnd],
    ) -> Iterator[bytes]:
        completion_id = protocol.new_id("cmpl")
        created = int(time.time())
        params = stream.provenance.parameters()
        model = request.model
        try:
            for event in events:
                if isinstance(event, TextDelta):
                    yield sse(
                        protocol.text_completion(
                            completion_id, created, model, event.text, None, params, None
                        )
                    )
                    continue
                yield sse(
                    protocol.text_completion(
                        completion_id, created, model, "", event.finish_reason, params, None
                    )
                )
                if request.include_usage:
                    yield sse(
                        protocol.text_completion(
                            completion_id,
                            created,
                            model,
                            "",
                            None,
                            params,
                            event.usage,
                            choices=False,
                        )
                    )
            yield DONE
        except TetherError as exc:
            log.warning("stream of %s broke: %s", model, exc.message)
            yield sse(error_body(exc))
        except Exception as exc:
            log.exception("stream of %s failed", model)
            yield sse(error_body(InternalError(f"internal error: {type(exc).__name__}")))
        finally:
            stream.close()

    # ------------------------------------------------------------------ embeddings

    def embeddings(self, body: Any) -> Answer:
        request: protocol.EmbeddingRequest = protocol.parse(protocol.EmbeddingRequest, body)
        texts = request.texts()
        try:
            vectors, tokens, provenance = self.router.embed(request.model, texts)
        except TetherError as exc:
            self.metrics.failures.labels(request.model, "embeddings", exc.reason).inc()
            raise
        if request.dimensions is not None and request.dimensions != vectors.shape[1]:
            raise protocol.OpenAIInvalid(
                f"model {request.model!r} gives {vectors.shape[1]} dimensions; "
                f"{request.dimensions} cannot be served",
                param="dimensions",
            )
        served_by = provenance.served_by
        self.metrics.prompt_tokens.labels(request.model, served_by).inc(tokens)
        self.metrics.requests.labels(
            request.model, "embeddings", served_by, str(provenance.route)
        ).inc()
        body_out = protocol.embeddings_list(
            request.model, vectors, request.encoding_format, tokens, provenance.parameters()
        )
        return Answer(body_out, None, provenance)
