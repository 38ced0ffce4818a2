"""The edge API's OpenAPI 3.1 document, served at ``GET /v2/openapi.json``.

Every operation is written out here by hand (path, method, parameters, bodies, every
status it can answer); the message schemas come from the same pydantic types as the JSON
Schema files under ``shared/schemas/``. A test checks that the operations listed here are
exactly the app's routes, so a new route without a description fails the build, and a
schemathesis run against a live agent checks that the answers match what is written.

``operationId`` is the Flask endpoint name for the unversioned path (``infer``) and the
name plus ``_version`` for the path with ``/versions/{version}``; the rate-limit rules
(``http.rate_limit.routes``) and the public endpoints use the unversioned name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

from edge.access.guard import PUBLIC_ENDPOINTS
from shared import __version__
from shared.codec import BINARY_CONTENT_TYPE, HEADER_LENGTH_HEADER, JSON_CONTENT_TYPE
from shared.protocol import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    RepositoryIndexEntry,
    ServerMetadata,
)

OPENAPI_VERSION = "3.1.0"
SECURITY_SCHEME = "bearerAuth"
_REF = "#/components/schemas/{model}"

#: Every status an error can carry, with what it means on this API.
ERRORS: dict[int, str] = {
    400: "Malformed request: bad JSON, shape, datatype, data or parameters.",
    401: "No valid bearer token (see `WWW-Authenticate`).",
    404: "No such model or version.",
    413: "The body or a tensor is over the configured limit.",
    429: "Rate limit reached; `Retry-After` says when to try again.",
    500: "A bug inside Tether or a runtime.",
    501: "A protocol extension this server does not implement.",
    503: "Not ready, or the cloud is unreachable or overloaded.",
    504: "The cloud did not answer before the deadline.",
}


@dataclass(frozen=True)
class Operation:
    """One documented route and method."""

    endpoint: str
    method: str
    path: str
    summary: str
    tag: str
    ok: dict[str, Any]
    errors: tuple[int, ...] = ()
    body: dict[str, Any] | None = None
    headers: tuple[dict[str, Any], ...] = ()
    extra_ok: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The component schema of this operation's error bodies (V2's or OpenAI's shape).
    error_schema: str = "ErrorResponse"
    #: The Flask rule when it is not the path with ``{x}`` written ``<x>``.
    rule: str | None = None

    @property
    def operation_id(self) -> str:
        return f"{self.endpoint}_version" if "{version}" in self.path else self.endpoint

    @property
    def public(self) -> bool:
        return self.endpoint in PUBLIC_ENDPOINTS


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON_CONTENT_TYPE: {"schema": schema}}}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": _REF.format(model=name)}


_LIVE = {
    "type": "object",
    "properties": {"live": {"type": "boolean"}},
    "required": ["live"],
}
_READY = {
    "type": "object",
    "properties": {"ready": {"type": "boolean"}},
    "required": ["ready"],
}
_MODEL_READY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    "required": ["name", "ready"],
}
_EMPTY = {"type": "object", "maxProperties": 0}
_HEADER_LENGTH = {
    "name": HEADER_LENGTH_HEADER,
    "in": "header",
    "required": False,
    "description": "Length of the JSON header when binary tensor data follows it.",
    "schema": {"type": "integer", "minimum": 0},
}
_INFER_BODY = {
    "required": True,
    "content": {
        JSON_CONTENT_TYPE: {"schema": _ref("InferenceRequest")},
        BINARY_CONTENT_TYPE: {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": f"JSON header of `{HEADER_LENGTH_HEADER}` bytes, then tensors.",
            }
        },
    },
}
_INFER_OK = {
    "description": "The outputs; binary tensors follow the JSON header when asked for.",
    "headers": {
        HEADER_LENGTH_HEADER: {
            "description": "Length of the JSON header (binary responses only).",
            "schema": {"type": "integer", "minimum": 0},
        }
    },
    "content": {
        JSON_CONTENT_TYPE: {"schema": _ref("InferenceResponse")},
        BINARY_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
    },
}

_MODEL_ERRORS = (400, 404, 500, 503)

# ---------------------------------------------------------------- the OpenAI-compatible /v1
_OPENAI_ERROR = {
    "type": "object",
    "description": "OpenAI's error object.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
            "required": ["message", "type", "param", "code"],
        }
    },
    "required": ["error"],
}
_USAGE = {
    "type": "object",
    "properties": {
        "prompt_tokens": {"type": "integer", "minimum": 0},
        "completion_tokens": {"type": "integer", "minimum": 0},
        "total_tokens": {"type": "integer", "minimum": 0},
    },
    "required": ["prompt_tokens", "total_tokens"],
}
_OPENAI_MODEL = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
    "required": ["id", "object", "created", "owned_by"],
}
_MODEL_LIST = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": _ref("OpenAIModel")},
    },
    "required": ["object", "data"],
}
_PROVENANCE = {
    "served_by": {"type": ["string", "null"], "description": "`edge` or `cloud`."},
    "route": {"type": ["string", "null"], "description": "The route that served it."},
    "cloud_worker": {"type": "string", "description": "The cloud worker that answered."},
    "cloud_error": {"type": "string", "description": "Why the cloud was not used."},
}


def _completion_object(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "object": {"const": kind},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice},
            "usage": _ref("OpenAIUsage"),
            **_PROVENANCE,
        },
        "required": ["id", "object", "created", "model", "choices"],
    }


_CHAT_COMPLETION = _completion_object(
    "chat.completion",
    {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "message": {
                "type": "object",
                "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}},
                "required": ["role", "content"],
            },
            "finish_reason": {"type": ["string", "null"]},
        },
        "required": ["index", "message", "finish_reason"],
    },
)
_TEXT_COMPLETION = _completion_object(
    "text_completion",
    {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "text": {"type": "string"},
            "finish_reason": {"type": ["string", "null"]},
        },
        "required": ["index", "text", "finish_reason"],
    },
)
_EMBEDDINGS = {
    "type": "object",
    "properties": {
        "object": {"const": "list"},
        "model": {"type": "string"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "description": "Floats, or base64 of little-endian float32.",
                        "oneOf": [{"type": "array", "items": {"type": "number"}},
                                  {"type": "string"}],
                    },
                },
                "required": ["object", "index", "embedding"],
            },
        },
        "usage": _ref("OpenAIUsage"),
        **_PROVENANCE,
    },
    "required": ["object", "model", "data", "usage"],
}  # fmt: skip
_SSE = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": "With `stream: true`: `data: {chunk}` events, then `data: [DONE]`.",
        }
    }
}


def _openai_ok(schema_name: str, streams: bool) -> dict[str, Any]:
    ok = _json(_ref(schema_name))
    if streams:
        ok["content"] = {**ok["content"], **_SSE}
    ok["headers"] = {
        "X-Tether-Served-By": {"description": "`edge` or `cloud`.", "schema": {"type": "string"}},
        "X-Tether-Route": {
            "description": "The route that served it.",
            "schema": {"type": "string"},
        },
    }
    return ok


def _openai_body(schema_name: str) -> dict[str, Any]:
    return {"required": True, "content": {JSON_CONTENT_TYPE: {"schema": _ref(schema_name)}}}


_OPENAI_ERRORS = (400, 404, 413, 500, 503, 504)

#: Every operation of the edge API. Keep in step with edge/http/routes.py (a test checks).
OPERATIONS: tuple[Operation, ...] = (
    Operation("server_metadata", "get", "/v2", "Server metadata", "health",
              _json(_ref("ServerMetadata"))),
    Operation("server_live", "get", "/v2/health/live", "Liveness", "health", _json(_LIVE),
              (), extra_ok={"503": _json(_LIVE, "Not live.")}),
    Operation("server_ready", "get", "/v2/health/ready", "Readiness: every model loaded",
              "health", _json(_READY), (), extra_ok={"503": _json(_READY, "Not ready.")}),
    Operation("openapi", "get", "/v2/openapi.json", "This document", "health",
              _json({"type": "object"})),
    Operation("model_metadata", "get", "/v2/models/{model}", "Model metadata", "models",
              _json(_ref("ModelMetadata")), _MODEL_ERRORS),
    Operation("model_metadata", "get", "/v2/models/{model}/versions/{version}",
              "Model version metadata", "models", _json(_ref("ModelMetadata")), _MODEL_ERRORS),
    Operation("model_ready", "get", "/v2/models/{model}/ready", "Model readiness", "models",
              _json(_MODEL_READY), _MODEL_ERRORS,
              extra_ok={"503": _json(_MODEL_READY, "Not ready.")}),
    Operation("model_ready", "get", "/v2/models/{model}/versions/{version}/ready",
              "Model version readiness", "models", _json(_MODEL_READY), _MODEL_ERRORS,
              extra_ok={"503": _json(_MODEL_READY, "Not ready.")}),
    Operation("infer", "post", "/v2/models/{model}/infer", "Inference", "inference",
              _INFER_OK, (400, 404, 413, 500, 501, 503, 504), _INFER_BODY, (_HEADER_LENGTH,)),
    Operation("infer", "post", "/v2/models/{model}/versions/{version}/infer",
              "Inference on one version", "inference", _INFER_OK,
              (400, 404, 413, 500, 501, 503, 504), _INFER_BODY, (_HEADER_LENGTH,)),
    Operation("repository_index", "post", "/v2/repository/index", "Repository index",
              "repository", _json({"type": "array", "items": _ref("RepositoryIndexEntry")}),
              (500,)),
    Operation("repository_load", "post", "/v2/repository/models/{model}/load",
              "Load or reload a model", "repository", _json(_EMPTY), (400, 404, 500, 503)),
    Operation("repository_unload", "post", "/v2/repository/models/{model}/unload",
              "Unload a model", "repository", _json(_EMPTY), (400, 404, 500, 503)),
    Operation("metrics", "get", "/metrics", "Prometheus metrics", "metrics",
              {"description": "Prometheus text exposition.",
               "content": {"text/plain": {"schema": {"type": "string"}}}}),
    Operation("list_models", "get", "/v1/models", "OpenAI: the served text models",
              "openai", _json(_ref("OpenAIModelList")), (), error_schema="OpenAIError"),
    Operation("retrieve_model", "get", "/v1/models/{model}", "OpenAI: one model",
              "openai", _json(_ref("OpenAIModel")), (404,), error_schema="OpenAIError",
              rule="/v1/models/<path:model>"),
    Operation("chat_completions", "post", "/v1/chat/completions",
              "OpenAI: chat completion", "openai", _openai_ok("OpenAIChatCompletion", True),
              _OPENAI_ERRORS, _openai_body("ChatCompletionRequest"), error_schema="OpenAIError"),
    Operation("completions", "post", "/v1/completions", "OpenAI: text completion",
              "openai", _openai_ok("OpenAITextCompletion", True), _OPENAI_ERRORS,
              _openai_body("CompletionRequest"), error_schema="OpenAIError"),
    Operation("embeddings", "post", "/v1/embeddings", "OpenAI: embeddings", "openai",
              _openai_ok("OpenAIEmbeddingList", False), _OPENAI_ERRORS,
              _openai_body("EmbeddingRequest"), error_schema="OpenAIError"),
)  # fmt: skip


def _path_parameters(path: str) -> list[dict[str, Any]]:
    parameters = []
    for name in ("model", "version"):
        if "{" + name + "}" in path:
            parameters.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": f"The {name} name." if name == "model" else "A version.",
                    "schema": {"type": "string", "minLength": 1},
                }
            )
    return parameters


def _operation(op: Operation) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": op.ok, **op.extra_ok}
    statuses = set(op.errors) | {500}
    if not op.public:
        statuses |= {401}
    statuses |= {429}  # every endpoint not exempt may be rate limited
    for status in sorted(statuses):
        entry = _json(_ref(op.error_schema), ERRORS[status])
        if status == 429:
            entry["headers"] = {
                "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
            }
        if status == 401:
            entry["headers"] = {
                "WWW-Authenticate": {
                    "description": "Bearer challenge.",
                    "schema": {"type": "string"},
                }
            }
        responses.setdefault(str(status), entry)
    body: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [*_path_parameters(op.path), *op.headers],
        "responses": responses,
    }
    if op.body is not None:
        body["requestBody"] = op.body
    if op.public:
        body["security"] = []
    return body


def _schemas() -> dict[str, Any]:
    from edge.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

    models = (
        InferenceRequest,
        InferenceResponse,
        ErrorResponse,
        ServerMetadata,
        ModelMetadata,
        RepositoryIndexEntry,
        ChatCompletionRequest,
        CompletionRequest,
        EmbeddingRequest,
    )
    _keys, top = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    schemas.update(
        {
            "OpenAIError": _OPENAI_ERROR,
            "OpenAIUsage": _USAGE,
            "OpenAIModel": _OPENAI_MODEL,
            "OpenAIModelList": _MODEL_LIST,
            "OpenAIChatCompletion": _CHAT_COMPLETION,
            "OpenAITextCompletion": _TEXT_COMPLETION,
            "OpenAIEmbeddingList": _EMBEDDINGS,
        }
    )
    return schemas


@lru_cache(maxsize=1)
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Tether edge API",
            "version": __version__,
            "description": "The Open Inference Protocol (KServe V2) over HTTP, with Triton's "
            "binary tensor extension, and the OpenAI-compatible API under `/v1`, as a "
            "Tether edge agent serves them.",
        },
        "servers": [{"url": "/"}],
        "security": [{SECURITY_SCHEME: []}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "One of the agent's API tokens (http.auth).",
                }
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy the caller may change)."""
    return copy.deepcopy(_document())


def documented_routes() -> set[tuple[str, str]]:
    """``(METHOD, flask-style rule)`` of every documented operation, to compare with the app."""
    return {
        (op.method.upper(), op.rule or op.path.replace("{", "<").replace("}", ">"))
        for op in OPERATIONS
    }
