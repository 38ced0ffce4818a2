"""Staging model versions in the repository so that a numeric folder only appears complete.

An artifact is either a tar archive (optionally gzipped) of a version folder's files
(``model.onnx`` or ``model.plan``, plus anything the runtime needs) or a bare model file.
It is unpacked into ``<repo>/<model>/.staging-<version>/``, every file is hashed into a
marker (``.tether-verified.json``), everything is fsynced, and the folder is renamed to
``<repo>/<model>/<version>/`` in one step. At start the agent re-hashes the files of the
version it is about to serve against the marker, so it never serves a torn copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from edge.fleet_state import fsync_dir, write_atomic
from serving.model_config import CONFIG_FILE
from shared.errors import InvalidInput
from shared.hashing import sha256_file
from shared.model_names import check_model_name

MARKER = ".tether-verified.json"
STAGING_PREFIX = ".staging-"


def model_folder(repository: Path, name: str) -> Path:
    """``<repository>/<name>``, for a valid model name only (never a path that leaves the
    repository, nor one of its scratch folders)."""
    return repository / check_model_name(name)


def staging_dir(model_dir: Path, version: int) -> Path:
    return model_dir / f"{STAGING_PREFIX}{version}"


def part_file(model_dir: Path, version: int) -> Path:
    return model_dir / f"{STAGING_PREFIX}{version}.part"


def stage(
    artifact: Path,
    model_dir: Path,
    version: int,
    *,
    sha256: str,
    model_filename: str,
    expected_files: dict[str, str] | None = None,
) -> Path:
    """Unpack a verified artifact and rename it into place; returns the version folder.

    ``expected_files`` (the manifest's ``files``) must match the artifact's members. The
    artifact's ``config.json`` becomes the model's config when the model has none yet
    (a model's first version); otherwise the model keeps its own and the artifact's copy
    stays in the version folder for reference. A version folder already in place with a
    valid marker for the same artifact is kept (the agent was killed after the rename
    and before it saved its state).
    """
    target = model_dir / str(version)
    if target.is_dir():
        if verify_version(target, sha256) is None:
            return target
        shutil.rmtree(target)
    scratch = staging_dir(model_dir, version)
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    digests = unpack(artifact, scratch, model_filename)
    if expected_files is not None:
        for name, digest in expected_files.items():
            if digests.get(name) != digest.lower():
                raise InvalidInput(f"artifact file {name} does not match the manifest's sha256")
    config = scratch / CONFIG_FILE
    if config.is_file() and not (model_dir / CONFIG_FILE).is_file():
        write_atomic(model_dir / CONFIG_FILE, config.read_bytes())
    files = {
        str(path.relative_to(scratch)): sha256_file(path)
        for path in sorted(scratch.rglob("*"))
        if path.is_file()
    }
    if not files:
        raise InvalidInput("the artifact holds no files")
    marker = {"version": version, "artifact_sha256": sha256, "files": files}
    (scratch / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))
    _fsync_tree(scratch)
    os.rename(scratch, target)
    fsync_dir(model_dir)
    return target


def unpack(artifact: Path, into: Path, model_filename: str) -> dict[str, str]:
    """Extract an artifact into ``into``; returns ``{member name: sha256}`` of its files.

    The cloud's artifacts (``cloud.artifacts.pack_version``) hold ``config.json`` and
    ``<version>/<files>``: the version folder's files land in ``into`` and the model's
    ``config.json`` beside them. A tar of bare files is taken as is; a file that is not a
    tar archive is the model file itself. Links, devices and paths that leave ``into``
    are refused.
    """
    if not tarfile.is_tarfile(artifact):
        shutil.copyfile(artifact, into / model_filename)
        return {model_filename: sha256_file(into / model_filename)}
    digests: dict[str, str] = {}
    with tarfile.open(artifact) as archive:
        members = archive.getmembers()
        names = [_clean(m.name) for m in members if m.isfile()]
        prefix = _common_folder([n for n in names if n != CONFIG_FILE])
        for member in members:
            name = _clean(member.name)
            if member.isdir() or not name:
                continue
            if not member.isfile():
                raise InvalidInput(f"artifact member {member.name!r} is not a regular file")
            relative = Path(name if name == CONFIG_FILE else name.removeprefix(prefix))
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise InvalidInput(f"artifact member {member.name!r} escapes its folder")
            source = archive.extractfile(member)
            if source is None:
                raise InvalidInput(f"artifact member {member.name!r} cannot be read")
            destination = into / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with source, open(destination, "wb") as handle:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    handle.write(chunk)
            digests[name] = digest.hexdigest()
    return digests


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _common_folder(names: list[str]) -> str:
    """``"3/"`` when every file sits in one top folder (an archive of a folder), else ``""``."""
    tops = {name.split("/", 1)[0] for name in names}
    if len(tops) == 1 and all("/" in name for name in names):
        return f"{tops.pop()}/"
    return ""


def verify_version(version_dir: Path, sha256: str | None = None) -> str | None:
    """``None`` when the folder's files match its marker (and ``sha256``), else why not."""
    try:
        marker: dict[str, Any] = json.loads((version_dir / MARKER).read_text())
    except FileNotFoundError:
        return "no verification marker"
    except (OSError, ValueError) as exc:
        return f"unreadable verification marker: {exc}"
    if sha256 is not None and marker.get("artifact_sha256") != sha256.lower():
        return "staged from a different artifact"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "verification marker lists no files"
    for name, digest in files.items():
        path = version_dir / name
        if not path.is_file():
            return f"missing file {name}"
        if sha256_file(path) != digest:
            return f"file {name} does not match its sha256"
    return None


def has_marker(version_dir: Path) -> bool:
    return (version_dir / MARKER).is_file()


def remove_version(model_dir: Path, version: int) -> None:
    """Delete a version folder: renamed aside first, so no half-deleted numeric folder stays."""
    target = model_dir / str(version)
    if not target.exists():
        return
    doomed = model_dir / f"{STAGING_PREFIX}{version}.removing"
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(target, doomed)
    fsync_dir(model_dir)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_staging(model_dir: Path, keep_parts: set[int]) -> None:
    """Remove partial unpacks and removals; keep ``.part`` downloads of ``keep_parts``."""
    if not model_dir.is_dir():
        return
    for entry in model_dir.iterdir():
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        if entry.name.endswith(".part"):
            number = entry.name[len(STAGING_PREFIX) : -len(".part")]
            if number.isdigit() and int(number) in keep_parts:
                continue
            entry.unlink(missing_ok=True)
        elif entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def artifact_digest(data: bytes) -> str:
    """The hex sha256 of bytes (what a manifest's ``sha256`` field holds)."""
    return hashlib.sha256(data).hexdigest()
