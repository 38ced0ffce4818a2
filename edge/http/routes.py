"""The Open Inference Protocol (KServe V2) HTTP routes: a thin transport over the data plane."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from edge.dataplane import DataPlane
from edge.http.responses import json_response, tensor_response
from shared.codec import HEADER_LENGTH_HEADER, decode_request, encode_response
from shared.errors import InvalidInput, TetherError

DATAPLANE_KEY = "tether.dataplane"
LIMITS_KEY = "tether.limits"

v2 = Blueprint("v2", __name__)


def _dataplane() -> DataPlane:
    plane: DataPlane = current_app.extensions[DATAPLANE_KEY]
    return plane


# ---------------------------------------------------------------------- health & metadata


@v2.get("/v2")
def server_metadata() -> Response:
    return json_response(_dataplane().server_metadata())


@v2.get("/v2/health/live")
def server_live() -> Response:
    live = _dataplane().live()
    return json_response({"live": live}, 200 if live else 503)


@v2.get("/v2/health/ready")
def server_ready() -> Response:
    ready = _dataplane().ready()
    return json_response({"ready": ready}, 200 if ready else 503)


@v2.get("/v2/openapi.json")
def openapi() -> Response:
    """This API's OpenAPI document (edge/http/openapi.py)."""
    from edge.http.openapi import openapi_document

    return json_response(openapi_document())


@v2.get("/v2/models/<model>")
@v2.get("/v2/models/<model>/versions/<version>")
def model_metadata(model: str, version: str | None = None) -> Response:
    return json_response(_dataplane().model_metadata(model, version))


@v2.get("/v2/models/<model>/ready")
@v2.get("/v2/models/<model>/versions/<version>/ready")
def model_ready(model: str, version: str | None = None) -> Response:
    ready = _dataplane().model_ready(model, version)
    return json_response({"name": model, "ready": ready}, 200 if ready else 503)


# ---------------------------------------------------------------------- inference


@v2.post("/v2/models/<model>/infer")
@v2.post("/v2/models/<model>/versions/<version>/infer")
def infer(model: str, version: str | None = None) -> Response:
    started = time.perf_counter()
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    environ = request.environ
    plane: DataPlane = app.extensions[DATAPLANE_KEY]
    runtime = plane.resolve_for_request(model, version)  # unknown model: 404 whatever the body
    try:
        decoded = decode_request(
            _body(environ, app.config["MAX_CONTENT_LENGTH"]),
            _header_length(environ),
            app.extensions[LIMITS_KEY],
        )
    except TetherError as exc:
        plane.count_failure(model, exc)
        raise
    prediction = plane.infer(model, version, decoded, started, runtime)
    payload, length = encode_response(
        model_name=model,
        model_version=prediction.model_version,
        outputs=prediction.outputs,
        request_id=decoded.id,
        parameters=prediction.parameters,
        requested=decoded.outputs,
        binary_default=decoded.binary_output_default,
    )
    return tensor_response(payload, length)


_HEADER_LENGTH_KEY = "HTTP_" + HEADER_LENGTH_HEADER.upper().replace("-", "_")


def _header_length(environ: dict[str, Any]) -> int | None:
    raw = environ.get(_HEADER_LENGTH_KEY)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} must be an integer") from None


def _body(environ: dict[str, Any], limit: int | None) -> bytes:
    """The request body, read straight from the WSGI input when its length is known."""
    raw = environ.get("CONTENT_LENGTH")
    if not raw:
        return request.get_data(cache=False)  # chunked: werkzeug enforces the size limit
    try:
        length = int(raw)
    except ValueError:
        raise InvalidInput("Content-Length must be an integer") from None
    if limit is not None and length > limit:
        raise RequestEntityTooLarge()
    body: bytes = environ["wsgi.input"].read(length)
    if len(body) != length:
        raise InvalidInput(f"body ended after {len(body)} of {length} bytes")
    return body


# ---------------------------------------------------------------------- repository


@v2.post("/v2/repository/index")
def repository_index() -> Response:
    return json_response(_dataplane().repository_index())


@v2.post("/v2/repository/models/<model>/load")
def repository_load(model: str) -> Response:
    _dataplane().load_model(model)
    return json_response({})


@v2.post("/v2/repository/models/<model>/unload")
def repository_unload(model: str) -> Response:
    _dataplane().unload_model(model)
    return json_response({})


# ---------------------------------------------------------------------- metrics


@v2.get("/metrics")
def metrics() -> Response:
    body, content_type = _dataplane().metrics.render()
    return Response(body, content_type=content_type)
