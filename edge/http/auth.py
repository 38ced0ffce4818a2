"""Bearer-token authentication and rate limiting of the local API (docs/security.md).

:func:`install_security` hooks one ``before_request`` guard into an app:

* an endpoint outside :data:`PUBLIC_ENDPOINTS` (health probes, the OpenAPI document)
  needs ``Authorization: Bearer <token>`` with one of the configured tokens whenever any
  token is configured, else 401 with ``WWW-Authenticate``; unknown paths are guarded too,
  so an anonymous caller learns nothing about what exists;
* with rate limiting on, each client (its token, or its address before it has proved one)
  draws from a token bucket per endpoint rule, else 429 with ``Retry-After``. Failed
  logins draw from the address's bucket too, so guessing tokens is throttled.

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest` against every
configured token, so the time taken says nothing about how close a guess was. Logs and the
rate limiter name a client by a short fingerprint of its token, never the token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, request

from edge.http.ratelimit import RateLimiter
from edge.settings import HttpAuthSettings, HttpSettings
from shared.errors import Unauthorized

log = logging.getLogger(__name__)

AUTH_KEY = "tether.auth"
RATE_LIMITER_KEY = "tether.rate_limiter"
#: Endpoints (operationIds) anyone may call: liveness, readiness, the API description.
PUBLIC_ENDPOINTS = frozenset({"server_live", "server_ready", "openapi"})
#: The challenge a 401 carries (RFC 6750).
CHALLENGE = 'Bearer realm="tether"'


def fingerprint(token: str) -> str:
    """A short, non-secret name of a token for logs and rate-limit buckets."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def read_tokens_file(path: Path) -> list[str]:
    """Tokens in a file: one per line, blank lines and ``#`` comments ignored."""
    tokens = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            tokens.append(line)
    return tokens


class TokenStore:
    """The tokens the API accepts: inline ones plus a file re-read when it changes.

    A file that cannot be read leaves only the inline tokens (fail closed: its tokens stop
    working, nothing opens up).
    """

    def __init__(
        self, tokens: Iterable[str] = (), file: Path | None = None, *, recheck_s: float = 1.0
    ) -> None:
        self._inline = tuple((_digest(t), fingerprint(t)) for t in tokens)
        self._file = file
        self._recheck_s = recheck_s
        self._from_file: tuple[tuple[bytes, str], ...] = ()
        self._file_stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        if file is not None:
            self._reload()

    @classmethod
    def from_settings(cls, settings: HttpAuthSettings) -> TokenStore:
        return cls((t.get_secret_value() for t in settings.tokens), settings.tokens_file)

    @property
    def enabled(self) -> bool:
        """True when authentication is enforced (any token source is configured)."""
        return bool(self._inline) or self._file is not None

    def identify(self, presented: str) -> str | None:
        """The fingerprint of the matching token, or ``None``; constant time per token."""
        self._maybe_reload()
        digest = _digest(presented)
        found: str | None = None
        for known, name in self._inline + self._from_file:
            if hmac.compare_digest(digest, known) and found is None:
                found = name
        return found

    def _maybe_reload(self) -> None:
        if self._file is None or time.monotonic() - self._checked < self._recheck_s:
            return
        with self._lock:
            if time.monotonic() - self._checked >= self._recheck_s:
                self._reload()

    def _reload(self) -> None:
        assert self._file is not None
        self._checked = time.monotonic()
        try:
            stat = os.stat(self._file)
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._file_stamp:
                return
            tokens = read_tokens_file(self._file)
        except OSError as exc:
            if self._file_stamp is not None or self._from_file:
                log.error("API tokens file %s unreadable (%s); its tokens are off", self._file, exc)
            self._from_file, self._file_stamp = (), None
            return
        self._from_file = tuple((_digest(t), fingerprint(t)) for t in tokens)
        self._file_stamp = stamp
        log.info("API tokens file %s: %d token(s)", self._file, len(tokens))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def endpoint_name(endpoint: str | None) -> str | None:
    """``v2.infer`` -> ``infer`` (the operationId); ``None`` when no route matched."""
    return endpoint.rsplit(".", 1)[-1] if endpoint else None


GUARD_KEY = "tether.guard"


class Guard:
    """Tokens and rate limits for one request; the Flask hook and the inference fast path
    (``edge/http/fast_infer.py``) both ask it, so both enforce the same rules."""

    def __init__(self, store: TokenStore, limiter: RateLimiter | None) -> None:
        self.store = store
        self.limiter = limiter

    @property
    def active(self) -> bool:
        return self.store.enabled or self.limiter is not None

    def check(
        self, endpoint: str | None, authorization: str | None, remote_addr: str | None
    ) -> None:
        """Raise :class:`Unauthorized` or :class:`TooManyRequests`, or let the request in."""
        store, limiter = self.store, self.limiter
        address = f"addr:{remote_addr or 'unknown'}"
        client = address
        if store.enabled and endpoint not in PUBLIC_ENDPOINTS:
            token = bearer_token(authorization)
            identity = store.identify(token) if token is not None else None
            if identity is None:
                if limiter is not None:
                    limiter.check(address, "unauthorized")
                raise Unauthorized(
                    "a valid bearer token is required"
                    if authorization is not None
                    else "this endpoint needs Authorization: Bearer <token>"
                )
            client = identity
        if limiter is not None and endpoint is not None:
            limiter.check(client, endpoint)


def install_security(app: Flask, http: HttpSettings) -> None:
    """Guard every request of ``app`` with the tokens and rate limits of ``http``."""
    store = TokenStore.from_settings(http.auth)
    limiter = RateLimiter.from_settings(http.rate_limit) if http.rate_limited else None
    app.extensions[AUTH_KEY] = store
    app.extensions[RATE_LIMITER_KEY] = limiter
    guard = Guard(store, limiter)
    app.extensions[GUARD_KEY] = guard
    if not guard.active:
        return

    @app.before_request
    def check() -> None:
        guard.check(
            endpoint_name(request.endpoint),
            request.headers.get("Authorization"),
            request.remote_addr,
        )
