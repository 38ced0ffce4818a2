"""Manifest signing and verification: what a device accepts and what it refuses."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path

import pytest

from shared.errors import InvalidInput, SignatureError
from shared.fleet import DeviceStatus, RolloutEvent, RolloutOrder
from shared.manifest import (
    Manifest,
    SignedManifest,
    canonical_bytes,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_text,
    save_private_key,
    sign_manifest,
    verify_manifest,
)

NOW = 1_700_000_000.0


def manifest(version: int = 3, expires_at: float = NOW + 3600) -> Manifest:
    return Manifest(
        model="digits",
        version=version,
        sha256="ab" * 32,
        size=1234,
        url="http://127.0.0.1:8090/artifacts/" + "ab" * 32,
        min_agent_version="0.1.0",
        target_hardware="cpu",
        created_at=NOW,
        expires_at=expires_at,
        files={"config.json": "cd" * 32},
    )


def test_a_signed_manifest_verifies_after_a_round_trip_through_json() -> None:
    key = generate_key()
    signed = sign_manifest(manifest(), key)
    wire = json.dumps(signed.dump())
    received = SignedManifest.parse(wire)
    verified = verify_manifest(received, [key.public_key()], now=NOW, last_trusted_version=2)
    assert verified.dump() == manifest().dump()
    assert signed.key_id == key_id(key) and len(signed.key_id) == 16


def test_canonical_bytes_are_sorted_compact_utf8() -> None:
    text = canonical_bytes(manifest()).decode("utf-8")
    assert " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert '"schema_version":"1.0"' in text


def test_a_tampered_manifest_is_refused() -> None:
    key = generate_key()
    signed = sign_manifest(manifest(), key)
    data = signed.dump()
    data["manifest"]["size"] = 999
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_manifest(
            SignedManifest.parse(data), [key.public_key()], now=NOW, last_trusted_version=None
        )


def test_a_broken_signature_is_refused() -> None:
    key = generate_key()
    signed = sign_manifest(manifest(), key)
    raw = bytearray(base64.b64decode(signed.signature))
    raw[0] ^= 1
    forged = signed.model_copy(update={"signature": base64.b64encode(raw).decode()})
    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_manifest(forged, [key.public_key()], now=NOW, last_trusted_version=None)


def test_a_manifest_signed_by_another_key_is_refused() -> None:
    signed = sign_manifest(manifest(), generate_key())
    with pytest.raises(SignatureError, match="signed by an untrusted key"):
        verify_manifest(signed, [generate_key().public_key()], now=NOW, last_trusted_version=None)


def test_any_trusted_key_verifies_so_keys_can_be_rotated() -> None:
    old, new = generate_key(), generate_key()
    signed = sign_manifest(manifest(), new)
    trusted = [old.public_key(), new.public_key()]
    assert verify_manifest(signed, trusted, now=NOW, last_trusted_version=None).version == 3


def test_an_expired_manifest_is_refused() -> None:
    key = generate_key()
    signed = sign_manifest(manifest(expires_at=NOW - 1), key)
    with pytest.raises(SignatureError, match=r"manifest expired at 2023-11-14T22:13:19"):
        verify_manifest(signed, [key.public_key()], now=NOW, last_trusted_version=None)


@pytest.mark.parametrize("trusted", [3, 4])
def test_a_version_not_newer_than_the_trusted_one_is_a_rollback_attack(trusted: int) -> None:
    key = generate_key()
    signed = sign_manifest(manifest(version=3), key)
    with pytest.raises(
        SignatureError,
        match=f"version 3 is not newer than the trusted version {trusted} \\(rollback attack refused\\)",
    ):
        verify_manifest(signed, [key.public_key()], now=NOW, last_trusted_version=trusted)


def test_keys_save_private_and_load_back(tmp_path: Path) -> None:
    key = generate_key()
    path = tmp_path / "keys" / "signing.pem"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_text(load_private_key(path)) == public_key_text(key)
    public = load_public_key(public_key_text(key))
    assert key_id(public) == key_id(key)
    assert len(base64.b64decode(public_key_text(key))) == 32
    with pytest.raises(InvalidInput):
        load_public_key("not a key")


def test_fleet_messages_round_trip_and_validate() -> None:
    signed = sign_manifest(manifest(), generate_key())
    order = RolloutOrder(
        rollout_id="r1", action="install", model="digits", signed_manifest=signed, issued_at=NOW
    )
    assert RolloutOrder.parse(json.dumps(order.dump())).dump() == order.dump()
    with pytest.raises(InvalidInput, match="needs a signed_manifest"):
        RolloutOrder.parse({"rollout_id": "r", "action": "install", "model": "m", "issued_at": 1})
    event = RolloutEvent.parse(
        {
            "rollout_id": "r",
            "model": "m",
            "version": 2,
            "step": "active",
            "at": 1.0,
            "health": {"requests": 10, "errors": 1, "shadow_agreement": 0.9},
            "future": 1,
        }
    )
    assert event.health is not None and event.health.error_rate == 0.1
    with pytest.raises(InvalidInput):
        RolloutEvent.parse({"rollout_id": "r", "model": "m", "version": 2, "step": "x", "at": 1})
    will = DeviceStatus.parse(b'{"kind":"device_status","device":"d1","online":false}')
    assert not will.online and will.models == {}


def test_an_unknown_major_schema_version_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"unsupported schema_version 2\.0"):
        DeviceStatus.parse({"schema_version": "2.0", "online": True})


def test_verification_uses_the_clock_it_is_given() -> None:
    key = generate_key()
    signed = sign_manifest(manifest(expires_at=time.time() + 60), key)
    verify_manifest(signed, [key.public_key()], now=time.time(), last_trusted_version=None)
