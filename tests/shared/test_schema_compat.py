"""The schema compatibility check: what a new minor may change, on real generated schemas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from shared.fleet import FLEET_TYPES, RolloutEvent, RolloutOrder
from shared.schema_compat import check_directory, incompatibilities, main, schema_history
from shared.schema_export import schema_files

SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"


def schema(cls: type[Any]) -> dict[str, Any]:
    return json.loads(json.dumps(cls.model_json_schema()))


def test_the_committed_history_is_compatible_and_complete() -> None:
    assert list(check_directory(SCHEMAS)) == []
    history = schema_history(SCHEMAS)
    for name, files in history.items():
        versions = [version for version, _ in files]
        major, newest = versions[-1]
        assert versions == [(major, minor) for minor in range(newest + 1)], (
            f"{name}: every minor of major {major} must stay committed, got {versions}"
        )
    current = {name.split(".v")[0] for name in schema_files()}
    assert current == set(history)
    for cls in FLEET_TYPES:
        assert history[cls.__name__][-1][0] == (cls.SCHEMA.major, cls.SCHEMA.minor)


def test_adding_an_optional_field_is_compatible() -> None:
    class Newer(RolloutOrder):
        priority: int | None = Field(None, ge=0)

    assert incompatibilities(schema(RolloutOrder), schema(Newer)) == []


def test_a_new_required_field_breaks_older_writers() -> None:
    class Newer(RolloutOrder):
        priority: int

    problems = incompatibilities(schema(RolloutOrder), schema(Newer))
    assert any("priority: new property is required" in p for p in problems), problems


def test_a_new_enum_value_breaks_older_readers() -> None:
    class Newer(RolloutEvent):
        step: Literal["received", "committed", "paused"]  # type: ignore[assignment]

    problems = incompatibilities(schema(RolloutEvent), schema(Newer))
    assert any("/step" in p and "enum" in p for p in problems), problems


def test_removed_retyped_and_tightened_fields_are_refused() -> None:
    old = schema(RolloutOrder)
    removed = json.loads(json.dumps(old))
    del removed["properties"]["health_window_s"]
    assert any("health_window_s: property removed" in p for p in incompatibilities(old, removed))
    retyped = json.loads(json.dumps(old))
    retyped["properties"]["issued_at"]["type"] = "string"
    assert any("issued_at" in p and "type" in p for p in incompatibilities(old, retyped))
    tightened = json.loads(json.dumps(old))
    tightened["properties"]["rollout_id"]["maxLength"] = 100
    assert any("maxLength changed" in p for p in incompatibilities(old, tightened))
    moved_default = json.loads(json.dumps(old))
    moved_default["properties"]["health_window_s"]["default"] = 30.0
    assert any("default changed" in p for p in incompatibilities(old, moved_default))


def test_a_change_inside_a_nested_type_is_found_through_refs(tmp_path: Path) -> None:
    """The CLI check over a folder: a manifest field retyped inside SignedManifest fails."""
    for path in SCHEMAS.glob("SignedManifest.v1.*.json"):
        shutil.copy(path, tmp_path / path.name)
    newest = max(tmp_path.glob("SignedManifest.v1.*.json"))
    data = json.loads(newest.read_text())
    data["$defs"]["Manifest"]["properties"]["size"]["type"] = "string"
    newest.write_text(json.dumps(data))
    problems = list(check_directory(tmp_path))
    assert problems and "manifest/size" in problems[0] and "type changed" in problems[0]
    assert main([str(tmp_path)]) == 1
    assert main([str(SCHEMAS)]) == 0
