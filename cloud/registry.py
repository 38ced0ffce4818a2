"""The model registry: publishes model versions as signed manifests over stored artifacts.

``publish`` packs ``models/repository/<name>/<version>`` (see :func:`cloud.artifacts.pack_version`),
stores the artifact by its sha256, makes binary deltas to it from the latest earlier
published versions (:mod:`shared.delta`, kept when clearly smaller than the artifact),
signs a :class:`~shared.manifest.Manifest` pointing at ``<artifact_url>/artifacts/<sha256>``
and listing the deltas, and records it in the fleet database. Versions are
monotonic per model: publishing a lower version than the latest is refused, and
republishing the same version is idempotent only for the same artifact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud.artifacts import ArtifactStore, pack_version
from cloud.fleet_db import FleetDB
from cloud.fleet_settings import FleetSettings
from shared.delta import make_delta
from shared.errors import InvalidInput
from shared.manifest import (
    DeltaArtifact,
    Manifest,
    SignedManifest,
    generate_key,
    load_private_key,
    save_private_key,
    sign_manifest,
)
from shared.model_names import check_model_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishOptions:
    """What a published manifest says besides the artifact itself."""

    expires_s: float = 30 * 86400.0
    target_hardware: str = "cpu"
    min_agent_version: str = "0.1.0"
    #: Deltas from this many of the latest earlier versions (0: none).
    delta_bases: int = 2
    #: A delta is offered only when at most this share of the full artifact's size.
    max_delta_ratio: float = 0.8


def load_or_create_dev_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The development signing key at ``path``, generated on first use (``created`` True).

    Only ``tether up`` calls this; it then names the key in ``TETHER_FLEET_SIGNING_KEY``
    for the services it starts, so nothing else ever falls back to it.
    """
    if path.is_file():
        return load_private_key(path), False
    key = generate_key()
    save_private_key(key, path)
    return key, True


def load_signing_key(settings: FleetSettings) -> Ed25519PrivateKey:
    """The fleet signing key the settings name (``signing_key``: ``--key`` or
    ``TETHER_FLEET_SIGNING_KEY``), refusing loudly when there is none to use.

    There is no silent default. The development key of ``tether up`` is refused for a
    fleet whose database is not the local SQLite file: that is a production configuration
    that would otherwise run on a key never meant to be trusted.
    """
    path = settings.signing_key
    if path is None:
        raise InvalidInput(
            "no fleet signing key: set TETHER_FLEET_SIGNING_KEY (or pass --key) to the key "
            "`tether fleet keygen` made; the development key is only for `tether up`"
        )
    if _same_file(path, settings.dev_key_path) and not settings.database.startswith("sqlite"):
        raise InvalidInput(
            f"refusing the development key {path} for the fleet database "
            f"{settings.database.split('://', 1)[0]}://...: make a real key with "
            "`tether fleet keygen` and set TETHER_FLEET_SIGNING_KEY"
        )
    try:
        return load_private_key(path)
    except OSError as exc:
        raise InvalidInput(f"cannot read the fleet signing key {path}: {exc.strerror}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


class Registry:
    """Publishes and looks up signed model versions."""

    def __init__(self, db: FleetDB, store: ArtifactStore, artifact_url: str) -> None:
        self.db = db
        self.store = store
        self.artifact_url = artifact_url.rstrip("/")

    def publish(
        self,
        version_dir: Path,
        key: Ed25519PrivateKey,
        options: PublishOptions | None = None,
        *,
        now: float | None = None,
    ) -> SignedManifest:
        """Pack, store, sign and record one model version; return its signed manifest."""
        options = options or PublishOptions()
        version_dir = Path(version_dir)
        model = check_model_name(version_dir.parent.name)
        try:
            version = int(version_dir.name)
        except ValueError:
            raise InvalidInput(
                f"{version_dir}: expected models/repository/<name>/<version number>"
            ) from None
        if version < 1:
            raise InvalidInput(f"{version_dir}: versions start at 1")
        latest = self.db.latest_manifest(model)
        if latest is not None and latest.manifest.version > version:
            raise InvalidInput(
                f"{model} version {version} is older than the published version "
                f"{latest.manifest.version}; versions are monotonic"
            )
        data, files = pack_version(version_dir)
        sha = self.store.put_bytes(data)
        existing = self.db.get_manifest(model, version)
        if existing is not None and existing.manifest.sha256 == sha:
            return existing
        now = time.time() if now is None else now
        manifest = Manifest(
            model=model,
            version=version,
            sha256=sha,
            size=len(data),
            url=f"{self.artifact_url}/artifacts/{sha}",
            min_agent_version=options.min_agent_version,
            target_hardware=options.target_hardware,
            created_at=now,
            expires_at=now + options.expires_s,
            files=files,
            deltas=self._deltas(model, version, data, options) or None,
        )
        signed = sign_manifest(manifest, key)
        self.db.put_manifest(signed)
        log.info("published %s version %d (%s, %d bytes)", model, version, sha[:12], len(data))
        return signed

    def _deltas(
        self, model: str, version: int, data: bytes, options: PublishOptions
    ) -> list[DeltaArtifact]:
        """Deltas to ``data`` from the latest earlier versions whose artifacts are stored."""
        earlier = [
            s.manifest
            for s in self.db.list_manifests()
            if s.manifest.model == model and s.manifest.version < version
        ]
        deltas = []
        for base in sorted(earlier, key=lambda m: m.version)[-options.delta_bases :]:
            path = self.store.path_of(base.sha256)
            if options.delta_bases <= 0 or not path.is_file():
                continue
            delta = make_delta(path.read_bytes(), data)
            if len(delta) > options.max_delta_ratio * len(data):
                continue
            sha = self.store.put_bytes(delta)
            deltas.append(
                DeltaArtifact(
                    from_version=base.version,
                    from_sha256=base.sha256,
                    sha256=sha,
                    size=len(delta),
                    url=f"{self.artifact_url}/artifacts/{sha}",
                )
            )
            log.info("%s v%d: delta from v%d is %d bytes", model, version, base.version, len(delta))
        return deltas

    def manifest(self, model: str, version: int) -> SignedManifest:
        signed = self.db.get_manifest(model, version)
        if signed is None:
            raise InvalidInput(
                f"{model} version {version} is not published (tether fleet publish first)"
            )
        return signed
