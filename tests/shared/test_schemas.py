"""The committed JSON Schema files: current ones exactly what the code generates."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from shared.schema_export import schema_files

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"


def test_committed_schemas_are_fresh() -> None:
    """The current version of every type is committed as generated; older versions stay."""
    expected = schema_files()
    committed = {p.name: p.read_text() for p in SCHEMAS.glob("*.json")}
    stale = sorted(name for name in expected if committed.get(name) != expected[name])
    assert not stale, f"shared/schemas is stale (run `make schemas`): changed {stale}"


def test_schemas_validate_real_messages() -> None:
    request = json.loads((SCHEMAS / "InferenceRequest.v1.0.json").read_text())
    message = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]}
    jsonschema.validate(message, request)
    bad = {"inputs": [{"name": "x", "datatype": "FP32"}]}
    try:
        jsonschema.validate(bad, request)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("a request without a shape must not validate")
