"""The repository's desired state, shared by every worker process of one agent.

The HTTP server runs several worker processes; a ``load`` or ``unload`` request reaches
only one of them. That worker records the order here (one JSON file, written atomically
under an advisory lock) and every worker applies any order it has not applied yet before
it answers its next request, so all workers agree on what is loaded.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

Action = Literal["load", "unload"]


class ControlFile:
    """``{model: {"action": "load"|"unload", "generation": n}}`` on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_suffix(".lock")
        self._seen_mtime: int | None = None

    def reset(self, models: list[str]) -> None:
        """Start a new run: every model in ``models`` is to be loaded, nothing else."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._write({name: {"action": "load", "generation": 0} for name in models})

    def record(
        self,
        name: str,
        action: Action,
        *,
        versions: list[int] | None = None,
        split: dict[str, float] | None = None,
    ) -> int:
        """Record an order; returns its generation (higher than any before for ``name``).

        ``versions`` pins the versions to serve (instead of the model's version policy);
        ``split`` weights the traffic between served versions (A/B tests).
        """
        with self._locked():
            state = self.read()
            generation = int(state.get(name, {}).get("generation", 0)) + 1
            order: dict[str, Any] = {"action": action, "generation": generation}
            if versions is not None:
                order["versions"] = sorted(versions)
            if split:
                order["split"] = split
            state[name] = order
            self._write(state)
            return generation

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return data if isinstance(data, dict) else {}

    def changed(self) -> bool:
        """Cheap check (one ``stat``) whether the file changed since the last call."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return False
        if mtime == self._seen_mtime:
            return False
        self._seen_mtime = mtime
        return True

    def _write(self, state: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
