"""The fleet agent's durable state: ``<data_dir>/fleet/state.json``.

What the agent must remember across a SIGKILL, per model: the version it serves
(``active``), the one to return to (``previous``), the one it is installing (``pending``),
the newest manifest version it has trusted (refusing older ones defeats rollback attacks),
how often it has started while an uncommitted version was active (crash-loop detection),
and which rollout orders it has finished (orders are retained, so they come again); and,
for the whole device, the sequence number and digest of the last signed order it accepted
(an older one is a replay: :mod:`shared.order_signing`).

Model names are folder names under the repository: a state file that names anything else
(written by hand, or by a version that did not check) is read without those entries.

Every change is written to a temporary file, fsynced, and renamed over the old file
(then the folder is fsynced), so a crash leaves either the old state or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.model_names import check_model_name, is_model_name

log = logging.getLogger(__name__)

#: Where one model stands in its rollout life cycle.
ModelPhase = Literal[
    "idle",
    "downloading",
    "verifying",
    "staged",
    "active",
    "committed",
    "rolled_back",
    "failed",
]

#: How many finished rollout ids are remembered per model.
HANDLED_KEEP = 32


class ModelState(BaseModel):
    """One model's rollout state on this device."""

    model_config = ConfigDict(extra="ignore")

    active: int | None = None
    previous: int | None = None
    pending: int | None = None
    phase: ModelPhase = "idle"
    rollout_id: str | None = None
    #: The newest manifest version this device verified and accepted, and its digest.
    trusted_version: int | None = None
    trusted_sha256: str | None = None
    #: Starts of the agent while ``active`` was not yet committed (crash-loop detection).
    boots: int = 0
    #: Wall-clock time the active version was switched in, and its health window.
    activated_at: float | None = None
    health_window_s: float | None = None
    shadow_sample_rate: float = 0.0
    #: Versions that failed or were rolled back: removed from disk when possible.
    discarded: list[int] = Field(default_factory=list)
    #: Rollout ids already finished (committed, failed, refused, rolled back).
    handled: list[str] = Field(default_factory=list)
    reason: str = ""
    #: The last final event reported (step, rollout id, version, reason): reported again
    #: once after a restart, in case the agent died before it went out.
    last_final: dict[str, str | int] | None = None

    def remember(self, rollout_id: str) -> None:
        """Mark a rollout order as finished, so its retained copy is not acted on again."""
        if rollout_id not in self.handled:
            self.handled = [*self.handled, rollout_id][-HANDLED_KEEP:]


class FleetState(BaseModel):
    """The whole durable state: one :class:`ModelState` per model name, and the last signed
    order accepted."""

    model_config = ConfigDict(extra="ignore")

    models: dict[str, ModelState] = Field(default_factory=dict)
    #: ``seq`` and digest of the last rollout order accepted (``shared.order_signing``).
    order_seq: int | None = None
    order_digest: str | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _only_model_names(cls, models: object) -> object:
        if not isinstance(models, dict):
            return models
        bad = [name for name in models if not is_model_name(name)]
        for name in bad:
            log.error("fleet state: ignoring an entry for the invalid model name %r", name)
        return {name: value for name, value in models.items() if name not in bad}

    def model(self, name: str) -> ModelState:
        """The state of ``name`` (a valid model name), created empty on first use."""
        state = self.models.get(name)
        if state is None:
            state = self.models[check_model_name(name)] = ModelState()
        return state


class StateStore:
    """Reads and atomically writes :class:`FleetState` to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> FleetState:
        """The saved state; an absent or unreadable file gives an empty state."""
        try:
            return FleetState.model_validate(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return FleetState()
        except (OSError, ValueError, ValidationError):
            # Only a torn write could do this, and writes are atomic; start clean but keep it.
            broken = self.path.with_suffix(".broken")
            os.replace(self.path, broken)
            return FleetState()

    def save(self, state: FleetState) -> None:
        """Write ``state`` durably: temp file, fsync, rename, fsync the folder."""
        data = json.dumps(state.model_dump(), indent=1, sort_keys=True).encode()
        with self._lock:
            write_atomic(self.path, data)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or creation in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
