"""Generates ``docs/configuration.md`` from the settings objects, so the reference stays true.

``python -m tether.config_reference > docs/configuration.md`` (``make docs``); a test fails
when the committed file differs from what this prints.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

#: (title, "module:Class", environment prefix, intro) for every settings object.
SETTINGS: list[tuple[str, str, str, str]] = [
    (
        "Edge agent (`tether edge`, `tether bridge`, `tether fleet-agent`)",
        "edge.settings:EdgeSettings",
        "TETHER_",
        "Read from the TOML file given with `--config`, then `TETHER_*` environment "
        "variables (nested fields with `__`, e.g. `TETHER_HTTP__PORT=9000`), then "
        "command-line flags, each overriding the one before. A relative path in the file is "
        "relative to the file's folder (so a config means the same from any working "
        "directory); in a variable or a flag, to the working directory.",
    ),
    (
        "Cloud worker (`tether cloud`)",
        "cloud.settings:CloudSettings",
        "TETHER_CLOUD_",
        "Read from the TOML file given with `--config`, then `TETHER_CLOUD_*` environment "
        "variables (the broker from `TETHER_MQTT_URL`, as on the edge). Relative paths as "
        "for the edge: in the file, relative to the file's folder.",
    ),
]


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("NoneType", "none")
    args = ", ".join(_type_name(a) for a in get_args(annotation))
    name = getattr(origin, "__name__", str(origin))
    if name in ("Union", "UnionType"):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    return f"{name}[{args}]"


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        name = getattr(field.default_factory, "__name__", "")
        if name == "gethostname":
            return "host name"
        if name == "default_worker_id":
            return "host-pid"
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{value!r}`" if value not in ({}, []) else "empty"
    if field.default is PydanticUndefined:
        return "required"
    if field.default is None:
        return "unset"
    if isinstance(field.default, Path):
        return f"`{field.default}`"
    return f"`{field.default!r}`"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _rows(model: type[BaseModel], prefix: str, env: str, out: list[str]) -> None:
    nested: list[tuple[str, type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        section = _section_model(field.annotation)
        if section is not None:
            nested.append((f"{prefix}{name}", section, f"{env}{name.upper()}__"))
            continue
        description = (field.description or "").replace("|", "\\|")
        kind = _type_name(field.annotation).replace("|", "\\|")
        out.append(
            f"| `{prefix}{name}` | `{env}{name.upper()}` | {kind} | {_default(field)} | {description} |"
        )
    for name, section, section_env in nested:
        out.append(f"| **[{name}]** | | | | {(section.__doc__ or '').strip().splitlines()[0]} |")
        _rows(section, f"{name}.", section_env, out)


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the settings objects by `python -m tether.config_reference`; "
        "do not edit by hand (a test checks it is current).",
        "",
    ]
    for title, target, env, intro in SETTINGS:
        module_name, _, class_name = target.partition(":")
        model = getattr(importlib.import_module(module_name), class_name)
        lines += [f"## {title}", "", intro, ""]
        lines += ["| setting | environment | type | default | what it does |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        _rows(model, "", env, lines)
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
