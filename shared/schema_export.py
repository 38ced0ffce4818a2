"""Generates the JSON Schema files under ``shared/schemas/`` from the message types.

Devices written in other languages validate against these files; a test fails when the
committed files of the current versions differ from what the code generates (run
``make schemas`` to refresh). Files of earlier versions stay as they were committed: they
are the history that ``make lint`` checks each new minor against
(:mod:`shared.schema_compat`), and are never regenerated.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shared.envelopes import ENVELOPE_TYPES
from shared.fleet import FLEET_TYPES
from shared.manifest import MANIFEST_TYPES
from shared.protocol import HTTP_MESSAGE_TYPES, VersionedModel


def schema_files() -> dict[str, str]:
    """File name -> JSON text for every versioned message type."""
    files: dict[str, str] = {}
    types: tuple[type[VersionedModel], ...] = (
        *HTTP_MESSAGE_TYPES,
        *ENVELOPE_TYPES,
        *MANIFEST_TYPES,
        *FLEET_TYPES,
    )
    for cls in types:
        schema = cls.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = (
            f"https://tether.dev/schemas/{cls.SCHEMA.major}.{cls.SCHEMA.minor}/{cls.__name__}.json"
        )
        schema["x-schema-version"] = str(cls.SCHEMA)
        name = f"{cls.__name__}.v{cls.SCHEMA.major}.{cls.SCHEMA.minor}.json"
        files[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return files


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in schema_files().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "schemas")
    for path in write(target):
        print(path)
