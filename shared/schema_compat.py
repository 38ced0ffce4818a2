"""Checks that each committed JSON Schema is compatible with the version before it.

The rule (see :mod:`shared.versioning`): within a major version, readers of every minor
must read messages of every other minor. So a new minor of a message type may only **add
optional properties** (new nested types for them included); everything an older reader or
writer relies on stays exactly as it was: the same properties with the same types,
enums, constraints and defaults, the same required list, no property removed.
Descriptions, titles and examples are free. A new major may change anything.

``python -m shared.schema_compat shared/schemas`` (run by ``make lint``) compares, for each
message type, every ``<Type>.v<major>.<minor>.json`` with the previous minor of the same
major, and exits 1 listing each incompatibility.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FILE = re.compile(r"^(?P<type>[A-Za-z0-9_]+)\.v(?P<major>\d+)\.(?P<minor>\d+)\.json$")
#: Keys that document a schema and do not change what validates.
_FREE = frozenset({"description", "title", "examples", "$comment", "$id", "x-schema-version"})


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What in ``new`` breaks readers or writers of ``old`` (empty: compatible)."""
    comparison = _Comparison(old, new)
    comparison.compare(old, new, "")
    return comparison.problems


def _resolve(node: Any, root: dict[str, Any]) -> Any:
    seen = 0
    while isinstance(node, dict) and "$ref" in node and seen < 32:
        ref = node["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return node
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, dict) else None
        if target is None:
            return node
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **extra} if extra else target
        seen += 1
    return node


class _Comparison:
    """One walk over an old and a new schema document, collecting what broke."""

    def __init__(self, old_root: dict[str, Any], new_root: dict[str, Any]) -> None:
        self.old_root = old_root
        self.new_root = new_root
        self.problems: list[str] = []
        self.seen: set[tuple[int, int]] = set()

    def compare(self, old: Any, new: Any, path: str) -> None:
        old = _resolve(old, self.old_root)
        new = _resolve(new, self.new_root)
        where = path or "/"
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                self.problems.append(f"{where}: changed from {old!r} to {new!r}")
            return
        if (id(old), id(new)) in self.seen:
            return
        self.seen.add((id(old), id(new)))
        for key in sorted((set(old) | set(new)) - _FREE - {"$defs", "definitions"}):
            if key not in new:
                self.problems.append(f"{where}: {key!r} removed (was {old[key]!r})")
            elif key not in old:
                self.problems.append(f"{where}: {key!r} added ({new[key]!r})")
            elif key == "properties":
                self.properties(old, new, path)
            elif key == "required":
                if sorted(old[key]) != sorted(new[key]):
                    self.problems.append(
                        f"{where}: required changed from {sorted(old[key])} to {sorted(new[key])}"
                    )
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems") and isinstance(old[key], list):
                if not isinstance(new[key], list) or len(old[key]) != len(new[key]):
                    self.problems.append(f"{where}: {key} alternatives changed")
                    continue
                for index, (a, b) in enumerate(zip(old[key], new[key], strict=True)):
                    self.compare(a, b, f"{path}/{key}/{index}")
            elif isinstance(old[key], dict) or isinstance(new[key], dict):
                self.compare(old[key], new[key], f"{path}/{key}")
            elif old[key] != new[key]:
                self.problems.append(f"{where}: {key} changed from {old[key]!r} to {new[key]!r}")

    def properties(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        old_props, new_props = old["properties"], new["properties"]
        for name in sorted(old_props):
            if name not in new_props:
                self.problems.append(f"{path}/{name}: property removed")
            else:
                self.compare(old_props[name], new_props[name], f"{path}/{name}")
        required = set(new.get("required", ()))
        for name in sorted(set(new_props) - set(old_props)):
            if name in required:
                self.problems.append(
                    f"{path}/{name}: new property is required (older writers omit it)"
                )


def schema_history(directory: Path) -> dict[str, list[tuple[tuple[int, int], Path]]]:
    """Message type -> its committed schema files, oldest version first."""
    history: dict[str, list[tuple[tuple[int, int], Path]]] = {}
    for path in directory.glob("*.json"):
        match = _FILE.match(path.name)
        if match:
            version = (int(match["major"]), int(match["minor"]))
            history.setdefault(match["type"], []).append((version, path))
    for files in history.values():
        files.sort()
    return history


def check_directory(directory: Path) -> Iterator[str]:
    """Every incompatibility between consecutive minors of each type, as report lines."""
    for _name, files in sorted(schema_history(directory).items()):
        for (old_version, old_path), (new_version, new_path) in itertools.pairwise(files):
            if old_version[0] != new_version[0]:
                continue  # a new major may change anything
            old = json.loads(old_path.read_text())
            new = json.loads(new_path.read_text())
            for problem in incompatibilities(old, new):
                yield f"{new_path.name} vs {old_path.name}: {problem}"


def main(argv: list[str]) -> int:
    directory = Path(argv[0]) if argv else Path(__file__).parent / "schemas"
    problems = list(check_directory(directory))
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} backward-incompatible schema changes (a new minor may only add")
        print("optional properties; anything else needs a new major version)")
        return 1
    count = sum(len(files) for files in schema_history(directory).values())
    print(f"{count} schema files in {directory}: each minor compatible with the one before")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
