"""Signed rollout manifests: what a model version is, and proof that the cloud published it.

A :class:`Manifest` names one model version's artifact (content address, size, where to
download it) and the conditions for installing it (hardware, agent version, expiry). The
cloud signs it with an ed25519 key; a device trusts a short list of public keys and refuses
an unsigned, tampered, expired or not-newer manifest (:func:`verify_manifest`).

Two signatures, both over :func:`canonical_json` (sorted keys, no whitespace, UTF-8):

* ``content_signature`` (since 1.1) covers the manifest object **exactly as sent**, every
  field, known to the reader or not. A device verifies it over the object it received, so
  it verifies a manifest from a registry of a newer minor that added fields it does not
  know (:func:`verify_manifest` keeps the received object for this).
* ``signature`` covers the manifest as a 1.0 device rebuilds it: the 1.0 fields only, with
  ``schema_version`` ``"1.0"`` (:func:`canonical_bytes`). Devices at 1.0 verify only this one
  (and use only the fields it covers); newer devices verify both.

Devices written in other languages rebuild those bytes from the manifest object they
received (numbers as the JSON text they arrived with; ``created_at`` and ``expires_at`` are
always written with a fractional part, e.g. ``1700000000.0``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from shared.errors import InvalidInput, SignatureError
from shared.protocol import VersionedModel
from shared.versioning import SchemaVersion

MANIFEST_SCHEMA = SchemaVersion(1, 1)
#: The manifest as a 1.0 device knows it: what the legacy ``signature`` covers.
LEGACY_SCHEMA = SchemaVersion(1, 0)
LEGACY_FIELDS = frozenset(
    {
        "model",
        "version",
        "sha256",
        "size",
        "url",
        "min_agent_version",
        "target_hardware",
        "created_at",
        "expires_at",
        "files",
    }
)


class DeltaArtifact(VersionedModel):
    """A binary patch that turns the artifact of ``from_version`` into this version's.

    A device that runs ``from_version`` (with the artifact whose sha256 is ``from_sha256``
    still on disk) may fetch this instead of the full artifact; the patched result must
    still match the manifest's ``sha256``. Covered by the manifest's signatures.
    """

    SCHEMA: ClassVar[SchemaVersion] = MANIFEST_SCHEMA

    from_version: int = Field(ge=1)
    from_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The base artifact's sha256.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the delta file.")
    size: int = Field(ge=0, description="Delta size in bytes.")
    url: str = Field(description="Where to download the delta (HTTP, Range supported).")
    format: Literal["zstd-patch"] = Field(
        "zstd-patch", description="zstd with the base artifact as the dictionary (patch-from)."
    )


class Manifest(VersionedModel):
    """One model version as published: the artifact to fetch and when it may be installed."""

    SCHEMA: ClassVar[SchemaVersion] = MANIFEST_SCHEMA

    model: str = Field(min_length=1, max_length=128)
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
    deltas: list[DeltaArtifact] | None = Field(
        None, description="Since 1.1: patches from earlier versions, smaller to download."
    )


class SignedManifest(VersionedModel):
    """A manifest with its ed25519 signatures and the id of the key that made them.

    Keeps the manifest object as it was received (or signed), so that re-sending it (the
    controller relays what the registry stored) and verifying it cover every field, also
    those this code does not know.
    """

    SCHEMA: ClassVar[SchemaVersion] = MANIFEST_SCHEMA

    manifest: Manifest
    signature: str = Field(
        description="Base64 ed25519 signature over the manifest as 1.0 readers rebuild it."
    )
    key_id: str = Field(description="First 16 hex chars of sha256(raw 32-byte public key).")
    content_signature: str | None = Field(
        None,
        description="Since 1.1: base64 ed25519 signature over canonical JSON of the manifest "
        "object exactly as sent, unknown fields included.",
    )
    _received: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_received(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        signed = handler(data)
        if isinstance(data, dict) and isinstance(data.get("manifest"), dict):
            signed._received = dict(data["manifest"])
        return signed

    @model_serializer(mode="wrap")
    def _send_as_received(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body: dict[str, Any] = handler(self)
        if self._received is not None and "manifest" in body:
            body["manifest"] = self._received
        return body

    def content(self) -> dict[str, Any]:
        """The manifest object as received or signed (what ``content_signature`` covers)."""
        return self._received if self._received is not None else self.manifest.dump()


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


def canonical_json(value: dict[str, Any]) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the bytes a signature covers."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise SignatureError(f"manifest cannot be written canonically: {exc}") from None
    return text.encode("utf-8")


def canonical_bytes(manifest: Manifest) -> bytes:
    """What the legacy ``signature`` covers: the manifest as a 1.0 reader rebuilds it."""
    body = manifest.model_dump(exclude_none=True, include=set(LEGACY_FIELDS))
    body["schema_version"] = str(LEGACY_SCHEMA)
    return canonical_json(body)


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> SignedManifest:
    """Sign ``manifest`` with ``key`` (both signatures; see the module docstring)."""
    content = manifest.dump()
    signed = SignedManifest(
        manifest=manifest,
        signature=base64.b64encode(key.sign(canonical_bytes(manifest))).decode("ascii"),
        key_id=key_id(key),
        content_signature=base64.b64encode(key.sign(canonical_json(content))).decode("ascii"),
    )
    signed._received = content
    return signed


def format_time(unix: float) -> str:
    """A Unix time as ISO 8601 UTC, for reasons people read."""
    return datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


def verify_manifest(
    signed: SignedManifest,
    trusted_keys: list[Ed25519PublicKey],
    *,
    now: float,
    last_trusted_version: int | None,
) -> Manifest:
    """Return the manifest if a trusted key signed it, it has not expired, and it is newer.

    Both signatures must verify: the legacy one over the 1.0 fields, and (when the registry
    is 1.1 or newer) the content signature over the manifest object as received, fields
    this code does not know included. Without a content signature (a 1.0 registry) only
    the 1.0 fields are signed, so only those are returned (``deltas`` and any later field
    dropped). ``last_trusted_version`` is the highest version of this model the device has
    ever accepted (``None`` for none): an equal or lower version is a rollback attack. The
    ``key_id`` is only a hint for picking the key; any trusted key that verifies counts.
    Raises :class:`SignatureError` saying why it refused.
    """
    manifest = signed.manifest
    _check_signature(signed, signed.signature, canonical_bytes(manifest), trusted_keys)
    if signed.content_signature is not None:
        content = canonical_json(signed.content())
        _check_signature(signed, signed.content_signature, content, trusted_keys)
    else:
        manifest = Manifest.model_validate(
            manifest.model_dump(exclude_none=True, include=set(LEGACY_FIELDS))
        )
    if now >= manifest.expires_at:
        raise SignatureError(f"manifest expired at {format_time(manifest.expires_at)}")
    if last_trusted_version is not None and manifest.version <= last_trusted_version:
        raise SignatureError(
            f"version {manifest.version} is not newer than the trusted version "
            f"{last_trusted_version} (rollback attack refused)"
        )
    return manifest


def _check_signature(
    signed: SignedManifest, text: str, message: bytes, trusted_keys: list[Ed25519PublicKey]
) -> None:
    manifest = signed.manifest
    verify_signature(
        text, message, signed.key_id, trusted_keys, f"{manifest.model} version {manifest.version}"
    )


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
    Manifests and rollout orders (:mod:`shared.order_signing`) are checked this way.
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


#: Manifest types, for JSON Schema generation.
MANIFEST_TYPES: tuple[type[VersionedModel], ...] = (Manifest, SignedManifest)
