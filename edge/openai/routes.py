"""The OpenAI-compatible HTTP routes under ``/v1``: parse, call the serving layer, send.

Everything else (validation, routing, streaming, metrics) is in
:class:`~edge.openai.serving.OpenAIServing`. Errors leave in OpenAI's shape; the bearer
tokens, rate limits and request ids are the agent's own (the app-wide guard and
middleware), so ``/v1`` needs the same ``Authorization: Bearer`` as V2, with the ``infer``
scope.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
from flask import Blueprint, Flask, Response, current_app, request

from edge.access.guard import CHALLENGE
from edge.access.tokens import INFER
from edge.http.auth import requires
from edge.openai.errors import error_body, openai_error
from edge.openai.protocol import OpenAIInvalid
from edge.openai.serving import Answer, OpenAIServing
from shared.codec import JSON_CONTENT_TYPE
from shared.errors import TetherError, TooManyRequests, Unauthorized

SERVING_KEY = "tether.openai"
SERVED_BY_HEADER = "X-Tether-Served-By"
ROUTE_HEADER = "X-Tether-Route"
#: Paths whose errors are rendered in OpenAI's shape (also for unknown paths under it).
PREFIX = "/v1/"

v1 = Blueprint("openai", __name__, url_prefix="/v1")


def _serving() -> OpenAIServing:
    serving: OpenAIServing = current_app.extensions[SERVING_KEY]
    return serving


def _json_body() -> Any:
    raw = request.get_data(cache=False)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIInvalid(
            f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


def _send(answer: Answer) -> Response:
    headers = {
        SERVED_BY_HEADER: answer.provenance.served_by,
        ROUTE_HEADER: answer.provenance.route or "local",
    }
    if answer.stream is not None:
        headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
        return Response(answer.stream, content_type="text/event-stream", headers=headers)
    return Response(orjson.dumps(answer.body), content_type=JSON_CONTENT_TYPE, headers=headers)


@v1.get("/models")
@requires(INFER)
def list_models() -> Response:
    return Response(orjson.dumps(_serving().list_models()), content_type=JSON_CONTENT_TYPE)


@v1.get("/models/<path:model>")
@requires(INFER)
def retrieve_model(model: str) -> Response:
    return Response(orjson.dumps(_serving().get_model(model)), content_type=JSON_CONTENT_TYPE)


@v1.post("/chat/completions")
@requires(INFER)
def chat_completions() -> Response:
    return _send(_serving().chat(_json_body()))


@v1.post("/completions")
@requires(INFER)
def completions() -> Response:
    return _send(_serving().completion(_json_body()))


@v1.post("/embeddings")
@requires(INFER)
def embeddings() -> Response:
    return _send(_serving().embeddings(_json_body()))


def error_response(exc: TetherError) -> Response:
    """A Tether error as OpenAI's error object, with the headers V2 errors carry."""
    response = Response(
        orjson.dumps(error_body(exc)), status=exc.status, content_type=JSON_CONTENT_TYPE
    )
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unauthorized):
        response.headers["WWW-Authenticate"] = CHALLENGE
    return response


def http_error_response(status: int, message: str) -> Response:
    """A routing error (unknown path, wrong method, body too large) in OpenAI's shape."""
    code = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
    return Response(
        orjson.dumps(openai_error(status, message, code=code)),
        status=status,
        content_type=JSON_CONTENT_TYPE,
    )


def install_openai(app: Flask, serving: OpenAIServing) -> None:
    """Serve the OpenAI-compatible API under ``/v1`` of ``app``."""
    app.extensions[SERVING_KEY] = serving
    app.register_blueprint(v1)
