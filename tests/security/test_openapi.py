"""The OpenAPI document at /v2/openapi.json is valid OpenAPI 3.1 and lists exactly the routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from jsonschema import Draft202012Validator

from edge.access.guard import PUBLIC_ENDPOINTS
from edge.http.openapi import OPERATIONS, documented_routes, openapi_document
from edge.settings import load_settings
from edge.worker import build_app
from harness.onnx_models import dense_model, write_model

DOCUMENTED_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    root = tmp_path_factory.mktemp("openapi")
    write_model(root / "repository", "dense", dense_model(4, 3, seed=1))
    return build_app(load_settings(None, repository=root / "repository", data_dir=root / "data"))


def app_routes(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        for method in (rule.methods or set()) & DOCUMENTED_METHODS:
            routes.add((method, rule.rule))
    return routes


def test_the_document_lists_exactly_the_apps_routes(app: Flask) -> None:
    assert documented_routes() == app_routes(app)


def test_the_served_document_is_the_generated_one(app: Flask) -> None:
    response = app.test_client().get("/v2/openapi.json")
    assert response.status_code == 200
    assert response.get_json() == openapi_document()


def test_the_document_is_valid_openapi_3_1() -> None:
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    Draft202012Validator(OPENAPI_31).validate(openapi_document())


def test_operation_ids_are_unique_and_public_ones_need_no_token() -> None:
    document = openapi_document()
    operations: list[dict[str, Any]] = [
        op for path in document["paths"].values() for op in path.values()
    ]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids)) == len(OPERATIONS)
    for op in operations:
        public = op["operationId"] in PUBLIC_ENDPOINTS
        assert (op.get("security") == []) is public
        assert ("401" in op["responses"]) is not public
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_every_reference_resolves() -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str):
                assert ref.startswith("#/components/schemas/"), ref
                assert ref.rsplit("/", 1)[-1] in schemas, ref
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)


def test_the_schemas_are_the_shared_message_types() -> None:
    schemas = openapi_document()["components"]["schemas"]
    shared = Path(__file__).resolve().parents[2] / "shared" / "schemas"
    for name in ("InferenceRequest", "InferenceResponse", "ModelMetadata", "ErrorResponse"):
        assert name in schemas
        assert (shared / f"{name}.v1.0.json").is_file()
