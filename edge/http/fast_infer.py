"""The inference endpoint's fast path: ``POST /v2/models/{m}[/versions/{v}]/infer`` served
as plain WSGI, in front of Flask.

Inference is the one route on the hot path, and Flask's per-request machinery (request
context, URL map, hooks, response object) costs more than decoding, running and encoding a
small model. This middleware answers exactly that route with the same pieces the Flask view
uses — the security :class:`~edge.http.auth.Guard`, :func:`~edge.http.inference.infer_body`,
the data plane and the error bodies — and hands every other request to Flask. Semantics are
identical; the Flask view (``edge/http/routes.py``) stays as the reference and the fallback
(``http.fast_path = false``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

import orjson
from flask import Flask

from edge.access.guard import CHALLENGE, Guard
from edge.access.tokens import INFER
from edge.http.auth import GUARD_KEY
from edge.http.inference import infer_body
from edge.http.routes import DATAPLANE_KEY, LIMITS_KEY
from serving.dataplane import DataPlane
from shared.codec import BINARY_CONTENT_TYPE, HEADER_LENGTH_HEADER, JSON_CONTENT_TYPE
from shared.errors import InternalError, TetherError, TooManyRequests, Unauthorized

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_STATUS = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


class InferFastPath:
    """WSGI middleware answering inference requests without Flask's request machinery."""

    def __init__(self, app: Flask, next_app: WSGIApp) -> None:
        self.app = app
        self.next_app = next_app
        self.plane: DataPlane = app.extensions[DATAPLANE_KEY]

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "POST":
            return self.next_app(environ, start_response)
        match = _INFER_PATH.match(environ.get("PATH_INFO", ""))
        if match is None:
            return self.next_app(environ, start_response)
        model, version = match.group(1), match.group(2)
        try:
            guard: Guard | None = self.app.extensions.get(GUARD_KEY)
            if guard is not None and guard.active:
                guard.check(
                    "infer", INFER, environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR")
                )
            payload, header_length = infer_body(
                self.plane,
                environ,
                model,
                version,
                self.app.extensions[LIMITS_KEY],
                self.app.config["MAX_CONTENT_LENGTH"],
            )
        except TetherError as exc:
            return error_response(start_response, exc)
        except Exception:
            log.exception("unexpected error in inference")
            return error_response(start_response, InternalError("internal error: inference"))
        headers = [
            ("Content-Type", JSON_CONTENT_TYPE if header_length is None else BINARY_CONTENT_TYPE),
            ("Content-Length", str(len(payload))),
        ]
        if header_length is not None:
            headers.append((HEADER_LENGTH_HEADER, str(header_length)))
        start_response("200 OK", headers)
        return [payload]


def error_response(start_response: StartResponse, exc: TetherError) -> list[bytes]:
    """The error body every transport sends, with the headers the Flask handler adds."""
    if exc.status >= 500:
        log.warning("request failed: %s", exc.message)
    body = orjson.dumps(exc.to_body())
    headers = [("Content-Type", JSON_CONTENT_TYPE), ("Content-Length", str(len(body)))]
    if isinstance(exc, TooManyRequests):
        headers.append(("Retry-After", str(max(1, math.ceil(exc.retry_after)))))
    if isinstance(exc, Unauthorized):
        headers.append(("WWW-Authenticate", CHALLENGE))
    start_response(_STATUS.get(exc.status, f"{exc.status} Error"), headers)
    return [body]
