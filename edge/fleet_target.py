"""Where the fleet agent switches the served version of a model.

In-process (tests, simulated devices, a single-process agent) it is the
:class:`~serving.repository.ModelRepository` itself: ``load(name, versions=[v])`` loads and
warms the new version first, then swaps atomically. Beside a gunicorn server it is the
control file the worker processes follow: the fleet agent records the pinned version and
every worker loads, warms and swaps before answering its next request; the agent's own
process never holds the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from serving.control_file import ControlFile
from serving.model_config import list_versions, load_model_config
from serving.repository import ModelRepository


class ServingTarget(Protocol):
    """Switches which version of a model serves."""

    def serve(self, name: str, version: int) -> None:
        """Serve exactly ``version`` of ``name`` from now on (atomically)."""

    def unload(self, name: str) -> None:
        """Stop serving ``name``."""

    def current(self, name: str) -> int | None:
        """The version serving now (the highest one, if several), or ``None``."""


class RepositoryTarget:
    """Switches an in-process :class:`ModelRepository`."""

    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def serve(self, name: str, version: int) -> None:
        self.repository.load(name, versions=[version])

    def unload(self, name: str) -> None:
        self.repository.unload(name)

    def current(self, name: str) -> int | None:
        versions = self.repository.served().get(name)
        if versions:
            return max(int(v) for v in versions)
        model_dir = self.repository.root / name
        on_disk = list_versions(model_dir) if model_dir.is_dir() else []
        return on_disk[-1] if on_disk else None


class ControlFileTarget:
    """Pins versions in the control file the server's worker processes follow."""

    def __init__(self, control: ControlFile, repository: Path | None = None) -> None:
        self.control = control
        self.repository = repository

    def serve(self, name: str, version: int) -> None:
        self.control.record(name, "load", versions=[version])

    def unload(self, name: str) -> None:
        self.control.record(name, "unload")

    def current(self, name: str) -> int | None:
        order = self.control.read().get(name, {})
        versions = order.get("versions")
        if order.get("action") == "load" and versions:
            return int(max(versions))
        if order.get("action") == "load" and self.repository is not None:
            # Loaded without a pin: the model's version policy picks from what is on disk.
            model_dir = self.repository / name
            if model_dir.is_dir():
                selected = load_model_config(model_dir).version_policy.select(
                    list_versions(model_dir)
                )
                return selected[-1] if selected else None
        return None
