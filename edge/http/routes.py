"""The Open Inference Protocol (KServe V2) HTTP routes: a thin transport over the data plane."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from edge.access.tokens import ADMIN, INFER
from edge.http.auth import requires
from edge.http.inference import infer_body
from edge.http.responses import json_response, tensor_response
from serving.dataplane import DataPlane
from serving.metrics import EdgeMetrics

DATAPLANE_KEY = "tether.dataplane"
LIMITS_KEY = "tether.limits"

v2 = Blueprint("v2", __name__)


def _dataplane() -> DataPlane[EdgeMetrics]:
    plane: DataPlane[EdgeMetrics] = current_app.extensions[DATAPLANE_KEY]
    return plane


# ---------------------------------------------------------------------- health & metadata


@v2.get("/v2")
@requires(INFER)
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
@requires(INFER)
def model_metadata(model: str, version: str | None = None) -> Response:
    return json_response(_dataplane().model_metadata(model, version))


@v2.get("/v2/models/<model>/ready")
@v2.get("/v2/models/<model>/versions/<version>/ready")
@requires(INFER)
def model_ready(model: str, version: str | None = None) -> Response:
    ready = _dataplane().model_ready(model, version)
    return json_response({"name": model, "ready": ready}, 200 if ready else 503)


# ---------------------------------------------------------------------- inference


@v2.post("/v2/models/<model>/infer")
@v2.post("/v2/models/<model>/versions/<version>/infer")
@requires(INFER)
def infer(model: str, version: str | None = None) -> Response:
    """Inference (the fast path in ``edge/http/fast_infer.py`` answers it first, the same way)."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    payload, length = infer_body(
        app.extensions[DATAPLANE_KEY],
        request.environ,
        model,
        version,
        app.extensions[LIMITS_KEY],
        app.config["MAX_CONTENT_LENGTH"],
    )
    return tensor_response(payload, length)


# ---------------------------------------------------------------------- repository


@v2.post("/v2/repository/index")
@requires(ADMIN)
def repository_index() -> Response:
    return json_response(_dataplane().repository_index())


@v2.post("/v2/repository/models/<model>/load")
@requires(ADMIN)
def repository_load(model: str) -> Response:
    _dataplane().load_model(model)
    return json_response({})


@v2.post("/v2/repository/models/<model>/unload")
@requires(ADMIN)
def repository_unload(model: str) -> Response:
    _dataplane().unload_model(model)
    return json_response({})


# ---------------------------------------------------------------------- metrics


@v2.get("/metrics")
@requires(ADMIN)
def metrics() -> Response:
    body, content_type = _dataplane().metrics.render()
    return Response(body, content_type=content_type)
