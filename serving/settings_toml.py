"""The TOML file behind Tether's settings, read so that its paths mean the same from anywhere.

A relative path written in a config file (``repository = "models/repository"``) is taken
relative to the folder of that file, not to the working directory of whoever starts the
process, so ``tether up``, systemd units and containers read one file the same way from
any directory. Paths from environment variables and command-line flags keep their usual
meaning (relative to the working directory), as do defaults.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_settings import BaseSettings, TomlConfigSettingsSource


class ConfigFileSource(TomlConfigSettingsSource):
    """A TOML settings source whose relative paths are anchored at the file's folder."""

    def __init__(self, settings_cls: type[BaseSettings], toml_file: Path) -> None:
        self._model = settings_cls
        super().__init__(settings_cls, toml_file=toml_file)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)
        return anchor_paths(self._model, data, Path(str(file_path)).resolve().parent)


def anchor_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``data`` (a TOML table for ``model``) with every relative path field joined to ``base``."""
    out = dict(data)
    for name, field in model.model_fields.items():
        if name in out:
            out[name] = _anchor(field.annotation, out[name], base)
    return out


def _anchor(annotation: Any, value: Any, base: Path) -> Any:
    if _is_path(annotation):
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            return str(base / value)
        return value
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                value = _anchor(arg, value, base)
        return value
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return anchor_paths(annotation, value, base) if isinstance(value, dict) else value
    if origin in (list, tuple) and args and isinstance(value, list):
        return [_anchor(args[0], item, base) for item in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {key: _anchor(args[1], item, base) for key, item in value.items()}
    return value


def _is_path(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Path)
