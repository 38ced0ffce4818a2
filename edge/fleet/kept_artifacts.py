"""The artifacts a device keeps as bases for delta downloads, and what an install fetched.

A delta (:mod:`shared.delta`) turns the artifact of the version a device runs into the new
one, so the device keeps the artifact of its latest installed version next to the
unpacked folder (one extra copy of the model on disk, the price of downloading only what
changed). Without a kept artifact, or with a delta that fails, the device downloads the
full artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fetched:
    """What an install downloaded: bytes over the network, and the delta's base if any."""

    bytes: int
    delta_from: int | None


class KeptArtifacts:
    """The artifact of each model's latest installed version, kept as a base for deltas.

    One file per model and version, ``<model>/<version>-<sha256>.tar``; staging a new
    version keeps it and the active one, and drops the rest.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def find(self, model: str, version: int) -> tuple[int, str, Path] | None:
        """``(version, sha256, path)`` of the kept artifact of ``model`` ``version``."""
        folder = self.root / model
        for path in folder.glob(f"{version}-*.tar") if folder.is_dir() else []:
            return version, path.stem.split("-", 1)[1], path
        return None

    def keep(self, model: str, version: int, sha256: str, part: Path, *, also: int | None) -> None:
        """Move the staged artifact ``part`` here; keep it and ``also``'s, drop the rest."""
        folder = self.root / model
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{version}-{sha256}.tar"
        if part.exists():
            part.replace(target)
        for path in folder.glob("*.tar"):
            if path != target and path.name.split("-", 1)[0] != str(also):
                path.unlink(missing_ok=True)
