"""Signed rollout manifests: what a model version is, and proof that the cloud published it.

A :class:`Manifest` names one model version's artifact (content address, size, where to
download it) and the conditions for installing it (hardware, agent version, expiry). The
cloud signs it with an ed25519 key; a device trusts a short list of public keys and refuses
an unsigned, tampered, expired or not-newer manifest (:func:`verify_manifest`).

The signature covers :func:`canonical_bytes`: the manifest's ``dump()`` as JSON with sorted
keys, no whitespace, UTF-8. Devices written in other languages rebuild those bytes from the
manifest object they received (numbers as the JSON text they arrived with; ``created_at`` and
``expires_at`` are always written with a fractional part, e.g. ``1700000000.0``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import Field

from shared.errors import InvalidInput, SignatureError
from shared.model_names import MODEL_NAME_PATTERN
from shared.protocol import VersionedModel
from shared.versioning import SchemaVersion

MANIFEST_SCHEMA = SchemaVersion(1, 0)


class Manifest(VersionedModel):
    """One model version as published: the artifact to fetch and when it may be installed."""

    SCHEMA: ClassVar[SchemaVersion] = MANIFEST_SCHEMA

    model: str = Field(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1, description="Monotonic per model; devices refuse a lower one.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the artifact.")
    size: int = Field(ge=0, description="Artifact size in bytes.")
    url: str = Field(description="Where to download the artifact (HTTP, Range supported).")
    min_agent_version: str = Field("0.1.0", description="Oldest fleet agent that may install.")
    target_hardware: str = Field("cpu", description='"cpu" or a GPU arch such as "sm_87".')
    created_at: float = Field(description="Unix time the manifest was signed.")
    expires_at: float = Field(description="Unix time after which devices refuse it.")
    files: dict[str, str] | None = Field(
        None, description="Optional: path inside the artifact -> hex sha256 of that file."
    )


class SignedManifest(VersionedModel):
    """A manifest with its ed25519 signature and the id of the key that made it."""

    SCHEMA: ClassVar[SchemaVersion] = MANIFEST_SCHEMA

    manifest: Manifest
    signature: str = Field(description="Base64 ed25519 signature over canonical_bytes(manifest).")
    key_id: str = Field(description="First 16 hex chars of sha256(raw 32-byte public key).")


# ---------------------------------------------------------------------------- keys


def generate_key() -> Ed25519PrivateKey:
    """A new ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: Path | str) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, readable by its owner only (mode 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.chmod(path, 0o600)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """Read a PEM ed25519 private key written by :func:`save_private_key`."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput(f"{path} is not an ed25519 key")
    return key


def _raw_public(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as devices are configured with it: base64 of the raw 32 bytes."""
    return base64.b64encode(_raw_public(key)).decode("ascii")


def load_public_key(text: str) -> Ed25519PublicKey:
    """Parse a public key written by :func:`public_key_text`."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"not a base64 ed25519 public key: {exc}") from None


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Short id of a key: first 16 hex chars of sha256 of the raw public key."""
    return hashlib.sha256(_raw_public(key)).hexdigest()[:16]


# ---------------------------------------------------------------------------- sign / verify


def canonical_bytes(manifest: Manifest) -> bytes:
    """The exact bytes the signature covers: sorted-key, compact, UTF-8 JSON of ``dump()``."""
    return json.dumps(
        manifest.dump(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    """Sign ``manifest`` with ``key``."""
    signature = key.sign(canonical_bytes(manifest))
    return SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(signature).decode("ascii"),
        key_id=key_id(key),
    )


def format_time(unix: float) -> str:
    """A Unix time as ISO 8601 UTC, for reasons people read."""
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


def verify_signature(
    signature_b64: str,
    message: bytes,
    claimed_key_id: str,
    trusted_keys: list[Ed25519PublicKey],
    what: str,
) -> None:
    """Return when a trusted key made ``signature_b64`` over ``message``, else raise
    :class:`SignatureError` saying why (``what`` names the signed thing in the reason).

    ``claimed_key_id`` is only a hint for picking the key first; any trusted key that
    verifies counts, so keys can be rotated by trusting the old and the new one for a while.
    """
    try:
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"signature does not verify for {what} (not base64)") from None
    by_id = {key_id(k): k for k in trusted_keys}
    candidates = [by_id[claimed_key_id]] if claimed_key_id in by_id else []
    candidates += [k for k in trusted_keys if k not in candidates]
    for key in candidates:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return
    if claimed_key_id not in by_id:
        raise SignatureError(
            f"{what} signed by an untrusted key (key_id {claimed_key_id[:32]!r} is not among "
            f"the {len(trusted_keys)} trusted keys)"
        )
    raise SignatureError(f"signature does not verify for {what}")


def verify_manifest(
    signed: SignedManifest,
    trusted_keys: list[Ed25519PublicKey],
    *,
    now: float,
    last_trusted_version: int | None,
) -> Manifest:
    """Return the manifest if a trusted key signed it, it has not expired, and it is newer.

    ``last_trusted_version`` is the highest version of this model the device has ever
    accepted (``None`` for none): an equal or lower version is a rollback attack.
    Raises :class:`SignatureError` saying why it refused.
    """
    manifest = signed.manifest
    verify_signature(
        signed.signature,
        canonical_bytes(manifest),
        signed.key_id,
        trusted_keys,
        f"{manifest.model} version {manifest.version}",
    )
    if now >= manifest.expires_at:
        raise SignatureError(f"manifest expired at {format_time(manifest.expires_at)}")
    if last_trusted_version is not None and manifest.version <= last_trusted_version:
        raise SignatureError(
            f"version {manifest.version} is not newer than the trusted version "
            f"{last_trusted_version} (rollback attack refused)"
        )
    return manifest


#: Manifest types, for JSON Schema generation.
MANIFEST_TYPES: tuple[type[VersionedModel], ...] = (Manifest, SignedManifest)
