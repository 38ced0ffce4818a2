"""The OpenAI API's request types and the shapes of its answers (the protocol, nothing else).

Requests are pydantic models validated once at the door: a wrong type or a value out of
OpenAI's documented range is a 400 naming the parameter. Unknown fields are ignored, as
OpenAI-compatible servers do, so newer clients keep working. Responses are plain dicts
built by the functions here, in OpenAI's shapes, with Tether's provenance (``served_by``,
``route``) as extra fields.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.runtimes.generation import ChatMessage, GenerationRequest, Usage
from shared.errors import InvalidInput

MAX_STOP_SEQUENCES = 4
#: Most texts one embeddings request may carry (OpenAI's limit).
MAX_EMBEDDING_INPUTS = 2048


class OpenAIInvalid(InvalidInput):
    """A 400 that names the parameter at fault (OpenAI's ``param``) and a ``code``."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)


class TextPart(BaseModel):
    """A text part of a message's content (other part types are not served)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    """One message as clients send it."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Sampling(_Request):
    """What chat and plain completions share."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def generation(self) -> GenerationRequest:
        return GenerationRequest(
            messages=tuple(ChatMessage(m.role, m.text()) for m in self.messages),
            max_tokens=self.new_tokens(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stops(),
        )


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (one prompt string)."""

    prompt: str | list[str]
    #: OpenAI's default for the legacy completions endpoint.
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request is served (n=1)")
        return value

    def generation(self) -> GenerationRequest:
        prompt = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return GenerationRequest(
            prompt=prompt,
            max_tokens=self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stops(),
        )


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)

    @field_validator("input")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


def parse(cls: type[BaseModel], body: Any) -> Any:
    """Validate a request body; the first problem becomes a 400 naming its parameter."""
    if not isinstance(body, dict):
        raise OpenAIInvalid("the request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        raise OpenAIInvalid(f"{where}: {first.get('msg', 'invalid value')}", param=param) from None


# ---------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def provenance(parameters: dict[str, Any]) -> dict[str, Any]:
    """The extra fields every answer carries: where it was served and by which route."""
    extra = {"served_by": parameters.get("served_by", "edge"), "route": parameters.get("route")}
    for key in OPTIONAL_PROVENANCE:
        if key in parameters:
            extra[key] = parameters[key]
    return extra


#: Provenance sent when known: why the cloud was not used, and which cloud worker answered.
OPTIONAL_PROVENANCE = ("cloud_error", "cloud_worker")


def chat_completion(
    completion_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_body(usage),
        "system_fingerprint": None,
        **provenance(parameters),
    }


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None,
    parameters: dict[str, Any],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta=None`` gives the final usage-only chunk."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_body(usage) if usage is not None else None,
        "system_fingerprint": None,
        **provenance(parameters),
    }


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    parameters: dict[str, Any],
    usage: Usage | None,
    *,
    choices: bool = True,
) -> dict[str, Any]:
    """A ``text_completion`` (also each streamed chunk of one)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
        if choices
        else [],
        "usage": usage_body(usage) if usage is not None else None,
        "system_fingerprint": None,
        **provenance(parameters),
    }


def embeddings_list(
    model: str,
    vectors: np.ndarray,
    encoding: str,
    prompt_tokens: int,
    parameters: dict[str, Any],
) -> dict[str, Any]:
    data = []
    for index, vector in enumerate(vectors):
        values = np.ascontiguousarray(vector, dtype="<f4")
        embedding: Any = (
            base64.b64encode(values.tobytes()).decode("ascii")
            if encoding == "base64"
            else values.tolist()
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        **provenance(parameters),
    }


def model_card(name: str, owned_by: str, created: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by, **extra}
