"""The repository's desired state, shared by every worker process of one agent.

The HTTP server runs several worker processes; a ``load`` or ``unload`` request reaches
only one of them. That worker records the order here (one JSON file, written atomically
under an advisory lock) and every worker applies any order it has not applied yet before
it answers its next request, so all workers agree on what is loaded.

Checking for news happens on every request, so it must not cost a system call: every
write also bumps a 64-bit counter in a small memory-mapped file (``<name>.gen``), which
each reader compares with the last value it saw — a read from shared memory.

Only valid model names (:mod:`shared.model_names`) are recorded, and entries under any
other name in the file are ignored when it is read: every worker parses it, and a name
becomes a folder path when an order is applied.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from shared.model_names import check_model_name, is_model_name

Action = Literal["load", "unload"]

_GEN = struct.Struct("<Q")


class ControlFile:
    """``{model: {"action": "load"|"unload", "generation": n}}`` on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_suffix(".lock")
        self._gen_path = path.with_suffix(".gen")
        self._gen: mmap.mmap | None = None
        self._seen: int | None = None

    def reset(self, models: list[str]) -> None:
        """Start a new run: every model in ``models`` is to be loaded, nothing else."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._write(
                {check_model_name(name): {"action": "load", "generation": 0} for name in models}
            )

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
        ``split`` weights the traffic between served versions (A/B tests). An invalid
        model name raises :class:`~shared.errors.InvalidInput` and records nothing.
        """
        check_model_name(name)
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
        """The orders by model name (entries with an invalid name or shape are left out)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if is_model_name(k) and isinstance(v, dict)}

    def changed(self) -> bool:
        """Whether any order was written since the last call (a read of shared memory)."""
        gen = self._generation()
        if gen is None or gen == self._seen:
            return False
        self._seen = gen
        return True

    def _generation(self) -> int | None:
        if self._gen is None:
            try:
                with open(self._gen_path, "rb") as handle:
                    self._gen = mmap.mmap(handle.fileno(), _GEN.size, access=mmap.ACCESS_READ)
            except (FileNotFoundError, ValueError):
                return None  # nothing written yet
        return int(_GEN.unpack_from(self._gen)[0])

    def _bump(self) -> None:
        """Advance the counter readers watch (called with the lock held, after a write)."""
        try:
            with open(self._gen_path, "r+b") as handle:
                value = _GEN.unpack(handle.read(_GEN.size))[0] + 1
                handle.seek(0)
                handle.write(_GEN.pack(value))
        except (FileNotFoundError, struct.error):
            with open(self._gen_path, "wb") as handle:
                handle.write(_GEN.pack(1))

    def _write(self, state: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.path)
        self._bump()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
