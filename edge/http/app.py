"""The Flask app factory for the local Open Inference Protocol API."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from flask import Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from edge.dataplane import DataPlane
from edge.http.auth import CHALLENGE
from edge.http.responses import json_response
from edge.http.routes import DATAPLANE_KEY, LIMITS_KEY, v2
from shared.codec import TensorLimits
from shared.errors import TetherError, TooManyRequests, Unauthorized
from shared.tracing import (
    bind_request_id,
    clean_request_id,
    current_request_id,
    unbind_request_id,
)

log = logging.getLogger(__name__)
access = logging.getLogger("tether.access")

REQUEST_ID_HEADER = "X-Request-Id"


def create_app(
    dataplane: DataPlane,
    *,
    max_body_bytes: int = 64 * 1024 * 1024,
    limits: TensorLimits | None = None,
    access_log: bool = False,
) -> Flask:
    """Build the HTTP app around a data plane; the app holds no state of its own."""
    app = Flask("tether.edge", static_folder=None)  # no file serving: every route is the API's
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.extensions[DATAPLANE_KEY] = dataplane
    app.extensions[LIMITS_KEY] = limits or TensorLimits()
    app.register_blueprint(v2)
    _register_request_ids(app, access_log)
    _register_error_handlers(app)
    return app


def _register_request_ids(app: Flask, access_log: bool) -> None:
    """Every request runs under an id (``X-Request-Id``, or a new one) that the response,
    the logs and the cloud (as the envelope's ``trace_id``) all carry."""

    @app.before_request
    def bind() -> None:
        g.request_id_token = bind_request_id(
            clean_request_id(request.headers.get(REQUEST_ID_HEADER))
        )
        g.started = time.perf_counter()

    @app.after_request
    def tag(response: Response) -> Response:
        request_id = current_request_id()
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        if access_log:
            elapsed = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000.0
            access.info(
                "%s %s %d %.3f ms", request.method, request.path, response.status_code, elapsed
            )
        return response

    @app.teardown_request
    def unbind(exc: BaseException | None) -> None:
        token = g.pop("request_id_token", None)
        if token is not None:
            unbind_request_id(token)


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(TetherError)
    def tether_error(exc: TetherError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
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
        response = json_response({"error": message}, status)
        if status == 405 and exc.get_response().headers.get("Allow"):
            response.headers["Allow"] = exc.get_response().headers["Allow"]
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unexpected error")
        return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)
