"""Text generation behind one interface: what a language-model runtime takes and yields.

A :class:`GenerationRequest` is the engine-neutral request (chat messages or a raw prompt,
sampling settings, limits). A generation is a stream of :class:`TextDelta` pieces ended by
exactly one :class:`GenerationEnd` carrying the finish reason and the token
:class:`Usage`; the non-streaming answer is the same stream, collected. The OpenAI
transport, the router's text routes and the cloud worker all speak these types, so a local
engine and a cloud stream are interchangeable.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from serving.provenance import Provenance
from serving.runtimes.base import Runtime
from shared.errors import InvalidInput

Role = Literal["system", "user", "assistant", "developer", "tool"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: ``messages`` (chat) or ``prompt`` (plain completion), and how."""

    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """A JSON-ready dict (what the cloud uplink carries)."""
        return {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages]
            if self.messages is not None
            else None,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": list(self.stop),
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> GenerationRequest:
        """The inverse of :meth:`to_wire`; malformed input is :class:`InvalidInput`."""
        try:
            messages = raw.get("messages")
            return cls(
                messages=tuple(ChatMessage(str(m["role"]), str(m["content"])) for m in messages)
                if messages is not None
                else None,
                prompt=raw.get("prompt"),
                max_tokens=raw.get("max_tokens"),
                temperature=float(raw.get("temperature", 1.0)),
                top_p=float(raw.get("top_p", 1.0)),
                seed=raw.get("seed"),
                stop=tuple(str(s) for s in raw.get("stop") or ()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed generation request: {exc}") from None


@dataclass(frozen=True)
class Usage:
    """Tokens read and written by one generation."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    """The next piece of generated text."""

    text: str


@dataclass(frozen=True)
class GenerationEnd:
    """The end of a generation: why it stopped, what it cost, where it ran."""

    finish_reason: FinishReason
    usage: Usage
    #: Facts learned only while generating: the version that answered, the cloud worker.
    model_version: str | None = None
    cloud_worker: str | None = None


GenerationEvent = TextDelta | GenerationEnd


@dataclass(frozen=True)
class Generation:
    """A whole (non-streamed) generation."""

    text: str
    end: GenerationEnd


def collect(events: Iterator[GenerationEvent]) -> Generation:
    """Join a stream into one :class:`Generation`."""
    pieces: list[str] = []
    for event in events:
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        else:
            return Generation("".join(pieces), event)
    raise InvalidInput("the generation ended without its final event")


class TextGenerator(Runtime):
    """A runtime that generates text: a language model (local engine or the cloud)."""

    task = "chat"
    #: Tokens of context (prompt plus completion) the model is served with.
    context_length: int = 0

    @abstractmethod
    def count_prompt_tokens(self, request: GenerationRequest) -> int:
        """Tokens the prompt of ``request`` takes, templated as the engine will."""

    @abstractmethod
    def generate(self, request: GenerationRequest) -> Iterator[GenerationEvent]:
        """Stream the answer to ``request``: text pieces, then one :class:`GenerationEnd`.

        Errors in the request (a prompt over the context) raise before the first event.
        """

    def predict(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        raise InvalidInput(
            f"model {self.name!r} is a language model: use POST /v1/chat/completions or "
            "/v1/completions"
        )

    def warm_up(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Generate one token so the first request pays no set-up."""
        for _ in self.generate(GenerationRequest(prompt="Hello", max_tokens=1, temperature=0)):
            pass


class TextEmbedder(Runtime):
    """A runtime that turns texts into embedding vectors."""

    task = "embedding"
    dimension: int = 0

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """``(embeddings [len(texts), dimension] float32, prompt tokens read)``."""


@dataclass
class TextStream:
    """A started generation: its events and where it is served (known before the first
    event, so a transport can send the provenance in its headers)."""

    events: Iterator[GenerationEvent]
    #: ``served_by``, ``route``, ``model`` and any fallback facts (``cloud_error``).
    provenance: Provenance

    def finished(self, end: GenerationEnd) -> Provenance:
        """The provenance completed with what the end of the generation told."""
        return replace(
            self.provenance,
            model_version=end.model_version or self.provenance.model_version,
            cloud_worker=end.cloud_worker or self.provenance.cloud_worker,
        )

    def close(self) -> None:
        """Stop the generation early (frees the engine or the cloud stream)."""
        close = getattr(self.events, "close", None)
        if close is not None:
            close()
