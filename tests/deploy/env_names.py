"""Checks that a ``TETHER_*`` variable a deploy file sets is one the settings objects read.

Each process reads one settings object (``edge.settings.EdgeSettings``,
``cloud.settings.CloudSettings``, ``cloud.fleet_settings.FleetSettings``); a variable is
known when its name, after the object's prefix, walks down that object's fields (nested
with the object's delimiter, any key below a ``dict`` field). The values are checked too,
by building the object from them.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_settings import BaseSettings

from cloud.fleet_settings import FleetSettings
from cloud.settings import MQTT_URL_VARIABLE, CloudSettings
from edge.settings import API_TOKENS_VARIABLE, EdgeSettings

ROOT = Path(__file__).resolve().parents[2]

#: Variables every ``tether`` command reads besides its settings object (tether/cli.py).
GLOBAL_VARIABLES = frozenset({"TETHER_LOG_FORMAT"})
#: Variables a settings object reads outside its prefix.
EXTRA_VARIABLES: dict[type[BaseSettings], frozenset[str]] = {
    EdgeSettings: frozenset({API_TOKENS_VARIABLE}),
    CloudSettings: frozenset({MQTT_URL_VARIABLE}),
    FleetSettings: frozenset({"TETHER_MQTT_URL"}),
}
#: Which settings object the process behind a service, container or image reads.
SETTINGS_BY_COMMAND: dict[str, type[BaseSettings]] = {
    "edge": EdgeSettings,
    "cloud": CloudSettings,
    "fleet": FleetSettings,
}

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
#: What a required variable (``${VAR:?message}``) stands for in the checks: a long token.
REQUIRED_PLACEHOLDER = "deploy-test-token-0123456789abcdef0123456789"


def interpolate_defaults(value: str) -> str:
    """A Compose-style value with ``${VAR:-default}`` replaced by its default and
    ``${VAR:?message}`` (set by the operator) by a placeholder."""

    def replace(match: re.Match[str]) -> str:
        if match.group(2) and match.group(2).endswith("?"):
            return REQUIRED_PLACEHOLDER
        return match.group(3) or ""

    return _INTERPOLATION.sub(replace, value)


def _models_of(annotation: Any) -> list[Any]:
    """The types an annotation may hold (Optional and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [t for arg in typing.get_args(annotation) for t in _models_of(arg)]
    if origin is typing.Annotated:
        return _models_of(typing.get_args(annotation)[0])
    return [annotation]


def unknown_reason(settings_cls: type[BaseSettings], name: str) -> str | None:
    """Why ``name`` is not read by ``settings_cls`` (``None`` when it is)."""
    if name in GLOBAL_VARIABLES or name in EXTRA_VARIABLES.get(settings_cls, frozenset()):
        return None
    prefix = str(settings_cls.model_config.get("env_prefix", ""))
    if not name.startswith(prefix):
        return f"{name} lacks the prefix {prefix!r} of {settings_cls.__name__}"
    delimiter = settings_cls.model_config.get("env_nested_delimiter")
    rest = name[len(prefix) :].lower()
    parts = rest.split(delimiter) if delimiter else [rest]
    model: type[BaseModel] = settings_cls
    for index, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"{name}: {model.__name__} has no field {part!r}"
        if index == len(parts) - 1:
            return None
        kinds = _models_of(field.annotation)
        if any(typing.get_origin(k) is dict or k is dict for k in kinds):
            return None
        nested = [k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)]
        if not nested:
            return f"{name}: {model.__name__}.{part} is not a section"
        model = nested[0]
    return None


def check_environment(
    settings_cls: type[BaseSettings],
    names: Mapping[str, str | None],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """Every ``TETHER_*`` name is known; the literal values build a valid settings object.

    ``names`` maps each variable to its value, or ``None`` when it comes from elsewhere
    (a Secret): such a variable is checked by name only.
    """
    tether = {k: v for k, v in names.items() if k.startswith("TETHER_")}
    problems = [r for k in tether if (r := unknown_reason(settings_cls, k)) is not None]
    assert not problems, f"{where}: " + "; ".join(problems)
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("TETHER_")]:
            patch.delenv(key)
        for key, value in tether.items():
            if value is not None and key not in GLOBAL_VARIABLES:
                patch.setenv(key, interpolate_defaults(value))
        try:
            settings_cls()
        except Exception as exc:  # pydantic's ValidationError, or a bad URL
            pytest.fail(f"{where}: {settings_cls.__name__} rejects these values: {exc}")
