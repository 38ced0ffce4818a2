"""The Flask app factory for the local Open Inference Protocol API."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from edge.dataplane import DataPlane
from edge.http.responses import json_response
from edge.http.routes import DATAPLANE_KEY, LIMITS_KEY, v2
from shared.codec import TensorLimits
from shared.errors import TetherError, TooManyRequests

log = logging.getLogger(__name__)


def create_app(
    dataplane: DataPlane,
    *,
    max_body_bytes: int = 64 * 1024 * 1024,
    limits: TensorLimits | None = None,
) -> Flask:
    """Build the HTTP app around a data plane; the app holds no state of its own."""
    app = Flask("tether.edge")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.extensions[DATAPLANE_KEY] = dataplane
    app.extensions[LIMITS_KEY] = limits or TensorLimits()
    app.register_blueprint(v2)
    _register_error_handlers(app)
    return app


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(TetherError)
    def tether_error(exc: TetherError) -> Response:
        if exc.status >= 500:
            log.warning("request failed: %s", exc.message)
        response = json_response(exc.to_body(), exc.status)
        if isinstance(exc, TooManyRequests):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
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
