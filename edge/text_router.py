"""The router of text models: which engine answers a chat, completion or embedding request.

The same ``[routes.<name>]`` table as tensor models (``docs/routing.md``), read for text:

* ``local`` — the device's model (the default for a text model in the repository);
* ``cloud`` — the cloud worker's model over the uplink;
* ``local-first`` — the device; the cloud when the device has ``max_queue`` generations in
  flight or fails to start one;
* ``cloud-first`` — the cloud; the device, marked ``degraded``, when the cloud cannot start
  the answer (unreachable, breaker open, no reply in time): the offline assistant.

On top of a mode, the **size rule** sends prompts over ``max_local_prompt_tokens`` tokens or
requests for more than ``max_local_new_tokens`` new tokens to the cloud (route ``size``);
if the cloud cannot take them, the device answers ``degraded`` when the request fits it.

The choice is made before the first token: a stream that breaks midway is not restarted
elsewhere (that would duplicate text); it ends with an error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge.settings import RouteSettings
from serving.provenance import Provenance
from serving.repository import ModelRepository
from serving.runtimes.base import Runtime
from serving.runtimes.generation import (
    GenerationEvent,
    GenerationRequest,
    TextEmbedder,
    TextGenerator,
    TextStream,
)
from shared.errors import InvalidInput, ModelNotFound, TetherError, Unavailable

log = logging.getLogger(__name__)


class CloudText(Protocol):
    """The cloud side of text routes (the uplink's text client)."""

    def generate(
        self, model: str, request: GenerationRequest, timeout_s: float | None
    ) -> Iterator[GenerationEvent]:
        """Start a generation in the cloud; raises if it cannot start (before any event)."""

    def embed(
        self, model: str, texts: Sequence[str], timeout_s: float | None
    ) -> tuple[np.ndarray, int]:
        """Embed ``texts`` in the cloud: ``(vectors, prompt tokens)``."""


@dataclass(frozen=True)
class TextModel:
    """A model name the OpenAI API offers, and what it does."""

    name: str
    task: str
    owned_by: str
    route: str


class TextRouter:
    """Resolves model names to text engines and starts generations by route."""

    def __init__(
        self,
        repository: ModelRepository,
        routes: Mapping[str, RouteSettings] | None = None,
        cloud: CloudText | None = None,
    ) -> None:
        self.repository = repository
        self.routes = dict(routes or {})
        self.cloud = cloud
        self._inflight: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ discovery

    def models(self) -> list[TextModel]:
        """Every text model name served: local text models and text routes."""
        self.repository.sync()
        found: dict[str, TextModel] = {}
        for name, versions in self.repository.served().items():
            runtime = next(iter(versions.values()), None)
            task = _task(runtime)
            if task is not None and (name not in self.routes):
                found[name] = TextModel(name, task, "tether-edge", "local")
        for name, route in self.routes.items():
            task = route.task
            if task is None and route.mode != "cloud":
                task = _task(self._local_or_none(route.local_model or name))
            if task is not None:
                owner = "tether-cloud" if route.mode == "cloud" else "tether-edge"
                found[name] = TextModel(name, task, owner, route.mode)
        return [found[name] for name in sorted(found)]

    def model(self, name: str) -> TextModel:
        for model in self.models():
            if model.name == name:
                return model
        raise ModelNotFound(f"the model {name!r} does not exist")

    def _local_or_none(self, name: str) -> Runtime | None:
        try:
            return self.repository.get(name)
        except TetherError:
            return None

    def _runtime(self, name: str) -> Runtime:
        self.repository.sync()
        try:
            return self.repository.get(name)
        except ModelNotFound:
            raise ModelNotFound(f"the model {name!r} does not exist") from None

    def _generator(self, name: str) -> TextGenerator:
        runtime = self._runtime(name)
        if not isinstance(runtime, TextGenerator):
            raise InvalidInput(f"the model {name!r} is not a language model")
        return runtime

    def _embedder(self, name: str) -> TextEmbedder:
        runtime = self._runtime(name)
        if not isinstance(runtime, TextEmbedder):
            raise InvalidInput(f"the model {name!r} is not an embedding model")
        return runtime

    # ------------------------------------------------------------------ generation

    def generate(self, name: str, request: GenerationRequest) -> TextStream:
        """Start generating for the model or route ``name``; errors before any text raise."""
        route = self.routes.get(name)
        if route is None or route.mode == "local":
            local = self._generator((route.local_model if route else None) or name)
            if route is not None and self._too_big(route, local, request):
                return self._size_rule(name, route, local, request)
            return self._run_local(local, request, "local")
        if route.mode == "cloud":
            return self._run_cloud(name, route, request, "cloud")
        local = self._generator(route.local_model or name)
        if self._too_big(route, local, request):
            return self._size_rule(name, route, local, request)
        if route.mode == "local-first":
            return self._local_first(name, route, local, request)
        return self._cloud_first(name, route, local, request)

    def _too_big(
        self, route: RouteSettings, local: TextGenerator, request: GenerationRequest
    ) -> bool:
        if route.max_local_new_tokens is not None and (
            request.max_tokens is None or request.max_tokens > route.max_local_new_tokens
        ):
            return True
        if route.max_local_prompt_tokens is not None:
            return local.count_prompt_tokens(request) > route.max_local_prompt_tokens
        return False

    def _size_rule(
        self, name: str, route: RouteSettings, local: TextGenerator, request: GenerationRequest
    ) -> TextStream:
        try:
            return self._run_cloud(name, route, request, "size")
        except TetherError as exc:
            if exc.status < 500:
                raise
            log.info(
                "%s: cloud cannot take a large request, answering locally: %s", name, exc.message
            )
            return self._degraded(local, request, exc)

    def _local_first(
        self, name: str, route: RouteSettings, local: TextGenerator, request: GenerationRequest
    ) -> TextStream:
        if self._inflight.get(local.name, 0) >= route.max_queue:
            try:
                return self._run_cloud(name, route, request, "overflow")
            except TetherError as exc:
                log.debug("local-first %s: device busy and cloud failed (%s)", name, exc.message)
        try:
            return self._run_local(local, request, "local")
        except TetherError as exc:
            if exc.status < 500:
                raise
            stream = self._run_cloud(name, route, request, "fallback")
            stream.provenance.local_error = exc.message
            return stream

    def _cloud_first(
        self, name: str, route: RouteSettings, local: TextGenerator, request: GenerationRequest
    ) -> TextStream:
        try:
            return self._run_cloud(name, route, request, "cloud")
        except TetherError as exc:
            if exc.status < 500:
                raise
            return self._degraded(local, request, exc)

    def _degraded(
        self, local: TextGenerator, request: GenerationRequest, exc: TetherError
    ) -> TextStream:
        stream = self._run_local(local, request, "degraded")
        stream.provenance.cloud_error = exc.message
        return stream

    def _run_local(
        self, local: TextGenerator, request: GenerationRequest, route: str
    ) -> TextStream:
        events = local.generate(request)  # raises on a request the model cannot take
        return TextStream(
            self._counted(local.name, events),
            Provenance(
                served_by="edge", route=route, model=local.name, model_version=local.version
            ),
        )

    def _counted(self, name: str, events: Iterator[GenerationEvent]) -> Iterator[GenerationEvent]:
        with self._lock:
            self._inflight[name] = self._inflight.get(name, 0) + 1
        try:
            yield from events
        finally:
            with self._lock:
                self._inflight[name] -= 1
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _run_cloud(
        self, name: str, route: RouteSettings, request: GenerationRequest, label: str
    ) -> TextStream:
        if self.cloud is None:
            raise Unavailable(f"model {name!r} is routed to the cloud but the uplink is off")
        model = route.cloud_model or name
        events = self.cloud.generate(model, request, route.timeout_s)
        return TextStream(events, Provenance(served_by="cloud", route=label, model=model))

    # ------------------------------------------------------------------ embeddings

    def embed(self, name: str, texts: Sequence[str]) -> tuple[np.ndarray, int, Provenance]:
        """Embed ``texts`` with the model or route ``name``: vectors, tokens, provenance."""
        route = self.routes.get(name)
        if route is not None and route.mode == "cloud":
            return self._embed_cloud(name, route, texts, "cloud")
        local_name = (route.local_model if route else None) or name
        if route is None or route.mode == "local":
            local = self._embedder(local_name)
            vectors, tokens = local.embed(texts)
            return vectors, tokens, Provenance(route="local", model=local.name)
        local = self._embedder(local_name)
        if route.mode == "cloud-first":
            try:
                return self._embed_cloud(name, route, texts, "cloud")
            except TetherError as exc:
                if exc.status < 500:
                    raise
                vectors, tokens = local.embed(texts)
                degraded = Provenance(route="degraded", model=local.name, cloud_error=exc.message)
                return vectors, tokens, degraded
        try:
            vectors, tokens = local.embed(texts)
        except TetherError as exc:
            if exc.status < 500:
                raise
            return self._embed_cloud(name, route, texts, "fallback")
        return vectors, tokens, Provenance(route="local", model=local.name)

    def _embed_cloud(
        self, name: str, route: RouteSettings, texts: Sequence[str], label: str
    ) -> tuple[np.ndarray, int, Provenance]:
        if self.cloud is None:
            raise Unavailable(f"model {name!r} is routed to the cloud but the uplink is off")
        model = route.cloud_model or name
        vectors, tokens = self.cloud.embed(model, texts, route.timeout_s)
        return vectors, tokens, Provenance(served_by="cloud", route=label, model=model)


def _task(runtime: Runtime | None) -> str | None:
    if isinstance(runtime, TextGenerator):
        return "chat"
    if isinstance(runtime, TextEmbedder):
        return "embedding"
    return None
