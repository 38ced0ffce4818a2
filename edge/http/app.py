"""The Flask app factory for the local Open Inference Protocol API."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from edge.access.guard import CHALLENGE
from edge.http.responses import json_response
from edge.http.routes import DATAPLANE_KEY, LIMITS_KEY, v2
from serving.dataplane import DataPlane
from shared.codec import TensorLimits
from shared.errors import TetherError, TooManyRequests, Unauthorized
from shared.tracing import clean_request_id, set_request_id

log = logging.getLogger(__name__)
access = logging.getLogger("tether.access")

REQUEST_ID_HEADER = "X-Request-Id"
#: Errors under this path are rendered in OpenAI's shape (edge/openai/routes.py).
OPENAI_PREFIX = "/v1/"

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def create_app(
    dataplane: DataPlane,
    *,
    max_body_bytes: int = 64 * 1024 * 1024,
    limits: TensorLimits | None = None,
    access_log: bool = False,
    fast_path: bool = True,
) -> Flask:
    """Build the HTTP app around a data plane; the app holds no state of its own."""
    app = Flask("tether.edge", static_folder=None)  # no file serving: every route is the API's
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.extensions[DATAPLANE_KEY] = dataplane
    app.extensions[LIMITS_KEY] = limits or TensorLimits()
    app.register_blueprint(v2)
    _register_error_handlers(app)
    wsgi: WSGIApp = app.wsgi_app
    if fast_path:
        from edge.http.fast_infer import InferFastPath

        wsgi = InferFastPath(app, wsgi)
    app.wsgi_app = RequestIdMiddleware(wsgi, access_log)  # type: ignore[method-assign]
    return app


class RequestIdMiddleware:
    """WSGI middleware: every request runs under an id (``X-Request-Id``, or a new one) that
    the response, the logs and the cloud (as the envelope's ``trace_id``) all carry.

    Plain WSGI rather than Flask hooks: it runs on every request, so it must be cheap.
    """

    def __init__(self, app: WSGIApp, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = clean_request_id(environ.get("HTTP_X_REQUEST_ID"))
        set_request_id(request_id)
        started = time.perf_counter()
        header = (REQUEST_ID_HEADER, request_id)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append(header)
            if self.access_log:
                access.info(
                    "%s %s %s %.3f ms",
                    environ.get("REQUEST_METHOD"),
                    environ.get("PATH_INFO"),
                    status.split(" ", 1)[0],
                    (time.perf_counter() - started) * 1000.0,
                )
            return start_response(status, headers, exc_info)

        return self.app(environ, start)


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(TetherError)
    def tether_error(exc: TetherError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        if request.path.startswith(OPENAI_PREFIX):  # the OpenAI API's own error shape
            from edge.openai.routes import error_response

            return error_response(exc)
        response = json_response(exc.to_body(), exc.status)
        if isinstance(exc, TooManyRequests):
            # whole seconds, rounded up: a client that waits that long is let in
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = CHALLENGE
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message: Any = exc.description or exc.name
        if status == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            message = f"request body is over the limit of {limit} bytes"
        if request.path.startswith(OPENAI_PREFIX):
            from edge.openai.routes import http_error_response

            response = http_error_response(status, str(message))
        else:
            response = json_response({"error": message}, status)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        if request.path.startswith(OPENAI_PREFIX):
            from edge.openai.routes import http_error_response

            return http_error_response(500, f"internal error: {type(exc).__name__}")
        return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)
