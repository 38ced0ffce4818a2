"""Signed rollout orders: a device acts on an order only when the fleet key made it for this
device, recently, and after every order the device already accepted.

Whoever can write ``tether/<device>/rollout`` (the controller's broker identity, a
compromised broker, a local process on an anonymous loopback listener) could otherwise roll
a model back, abort an install, or name a folder for the agent to clean up. So the
controller signs every order (:func:`sign_order`) with the fleet's ed25519 key, the key
that signs manifests, over the whole order including:

* ``device``: the one device it is for (an order copied to another device is refused);
* ``seq``: a number that grows with every order the controller signs; a device keeps the
  highest one it accepted and refuses anything lower (a replay), or equal with other
  content;
* ``expires_at``: after it, the order is refused (a replay on a device that lost its state).

The signature covers :func:`signed_bytes`: the order's JSON object as received, without
``signature`` and ``key_id``, written with sorted keys, no whitespace, UTF-8 (the same
canonical form as manifests). It is checked on the received object before the order is
parsed, so a field a device does not know yet is still covered, and nothing an attacker
wrote is acted on. :func:`verify_order` gives the order or raises :class:`OrderRefused`
saying why; :func:`replay_reason` is the check against what the device last accepted.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import SignatureError, TetherError
from shared.fleet import RolloutOrder
from shared.manifest import canonical_json, format_time, key_id, verify_signature
from shared.model_names import is_model_name

#: The largest order payload a device reads (an install with a manifest listing many files
#: is a few KiB); anything larger is refused unread.
MAX_ORDER_BYTES = 256 * 1024
#: Fields outside the signed bytes.
SIGNATURE_FIELDS = ("signature", "key_id")


class OrderRefused(SignatureError):
    """An order a device must not act on; ``message`` says why, ``claimed`` what it said."""

    reason = "order_refused"

    def __init__(self, message: str, claimed: str = "") -> None:
        super().__init__(message)
        self.claimed = claimed


@dataclass(frozen=True)
class VerifiedOrder:
    """An order whose signature, device and expiry checked out, and the digest of its
    signed bytes (the same order delivered again has the same digest)."""

    order: RolloutOrder
    digest: str


def signed_bytes(body: dict[str, Any]) -> bytes:
    """The bytes the signature covers: ``body`` without the signature fields, canonical JSON
    (:func:`shared.manifest.canonical_json`; :class:`SignatureError` if it has none)."""
    return canonical_json({k: v for k, v in body.items() if k not in SIGNATURE_FIELDS})


def sign_order(order: RolloutOrder, key: Ed25519PrivateKey) -> bytes:
    """The order as it goes on the wire: its JSON with ``signature`` and ``key_id`` added.

    The order must name its ``device``, ``seq`` and ``expires_at``.
    """
    if order.device is None or order.seq is None or order.expires_at is None:
        raise ValueError("a signed order needs device, seq and expires_at")
    body = order.dump()
    for name in SIGNATURE_FIELDS:
        body.pop(name, None)
    signature = base64.b64encode(key.sign(signed_bytes(body))).decode("ascii")
    return orjson.dumps({**body, "signature": signature, "key_id": key_id(key)})


def verify_order(
    payload: bytes,
    trusted_keys: list[Ed25519PublicKey],
    *,
    device: str,
    now: float,
    accepted_digest: str | None = None,
) -> VerifiedOrder:
    """The order in ``payload`` if a trusted key signed it for ``device`` and it has not
    expired; else :class:`OrderRefused` with the reason.

    ``accepted_digest`` is the digest of the order the device accepted last: that order,
    delivered again after its expiry (a retained order after a restart), is still the one
    being carried out, so it is not refused as expired. Whether an order is newer than
    what the device accepted is :func:`replay_reason`'s question.
    """
    if len(payload) > MAX_ORDER_BYTES:
        raise OrderRefused(f"order of {len(payload)} bytes is over {MAX_ORDER_BYTES}")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise OrderRefused("order is not JSON") from None
    if not isinstance(body, dict):
        raise OrderRefused("order is not a JSON object")
    claimed = _claims(body)
    signature, claimed_key = body.get("signature"), body.get("key_id", "")
    if not isinstance(signature, str) or not signature:
        raise OrderRefused("unsigned order (no signature)", claimed)
    try:
        message = signed_bytes(body)
    except SignatureError:
        raise OrderRefused("order cannot be read back as canonical JSON", claimed) from None
    try:
        verify_signature(
            signature,
            message,
            claimed_key if isinstance(claimed_key, str) else "",
            trusted_keys,
            "the order",
        )
    except SignatureError as exc:
        raise OrderRefused(exc.message, claimed) from None
    try:
        order = RolloutOrder.parse(body)
    except TetherError as exc:
        raise OrderRefused(f"signed order is invalid: {exc.message}", claimed) from None
    if order.device != device:
        raise OrderRefused(f"order is for device {order.device!r}, not {device!r}", claimed)
    if order.seq is None or order.expires_at is None:
        raise OrderRefused("signed order has no seq or no expiry", claimed)
    digest = hashlib.sha256(message).hexdigest()
    if now >= order.expires_at and digest != accepted_digest:
        raise OrderRefused(f"order expired at {format_time(order.expires_at)}", claimed)
    return VerifiedOrder(order, digest)


def replay_reason(
    verified: VerifiedOrder, last_seq: int | None, last_digest: str | None
) -> str | None:
    """``None`` when ``verified`` may be acted on after the device's last accepted order
    (``last_seq``, ``last_digest``): it is newer, or the very same order delivered again
    (a retained order comes back on every reconnect). Else why it is a replay."""
    seq = verified.order.seq or 0
    if last_seq is None or seq > last_seq:
        return None
    if seq == last_seq and verified.digest == last_digest:
        return None
    return f"replayed order: sequence {seq} is not newer than the last accepted {last_seq}"


def _claims(body: dict[str, Any]) -> str:
    """What an unverified order says it is, for the refusal's reason (bounded, quoted)."""
    parts = []
    for name in ("action", "rollout_id", "model", "device"):
        value = body.get(name)
        if isinstance(value, str):
            shown = value if is_model_name(value) else repr(value[:40])
            parts.append(f"{name} {shown}")
    return ", ".join(parts)[:200]
