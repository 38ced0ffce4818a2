"""The one access check every transport asks: bearer tokens, their scopes and rate limits
(docs/security.md).

* A call to an endpoint outside :data:`PUBLIC_ENDPOINTS` (health probes, the API
  description) needs a bearer token with one of the configured tokens whenever any token
  is configured, else 401 with :data:`CHALLENGE`;
* the token must carry the scope the endpoint needs, else 403;
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
from dataclasses import dataclass
from pathlib import Path

from edge.access.ratelimit import RateLimiter
from edge.access.tokens import DEFAULT_SCOPES, Scope, TokenEntry, read_tokens_file
from edge.settings import HttpAuthSettings, HttpSettings
from shared.errors import Forbidden, Unauthorized

log = logging.getLogger(__name__)

#: Endpoints (operationIds) anyone may call: liveness, readiness, the API description.
PUBLIC_ENDPOINTS = frozenset({"server_live", "server_ready", "openapi"})
#: The challenge a 401 carries (RFC 6750).
CHALLENGE = 'Bearer realm="tether"'


def fingerprint(token: str) -> str:
    """A short, non-secret name of a token for logs and rate-limit buckets."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Identity:
    """Who presented a valid token: its fingerprint and what it may do."""

    name: str
    scopes: frozenset[Scope]


_Known = tuple[bytes, Identity]


class TokenStore:
    """The tokens the API accepts: inline ones plus a file re-read when it changes.

    A file that cannot be read leaves only the inline tokens (fail closed: its tokens stop
    working, nothing opens up); an invalid line of it is skipped and logged by number (its
    token does not work), the valid lines keep working.
    """

    def __init__(
        self,
        tokens: Iterable[TokenEntry] = (),
        file: Path | None = None,
        *,
        default_scopes: Iterable[Scope] = DEFAULT_SCOPES,
        recheck_s: float = 1.0,
    ) -> None:
        self._default = frozenset(default_scopes)
        self._inline = self._known(tokens)
        self._file = file
        self._recheck_s = recheck_s
        self._from_file: tuple[_Known, ...] = ()
        self._file_stamp: tuple[int, int] | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()
        if file is not None:
            self._reload()

    @classmethod
    def from_settings(cls, settings: HttpAuthSettings) -> TokenStore:
        return cls(settings.entries(), settings.tokens_file, default_scopes=settings.default_scopes)

    def _known(self, entries: Iterable[TokenEntry]) -> tuple[_Known, ...]:
        return tuple(
            (_digest(e.token), Identity(fingerprint(e.token), e.granted(self._default)))
            for e in entries
        )

    @property
    def enabled(self) -> bool:
        """True when authentication is enforced (any token source is configured)."""
        return bool(self._inline) or self._file is not None

    def identify(self, presented: str) -> Identity | None:
        """The matching token's identity, or ``None``; constant time per token."""
        self._maybe_reload()
        digest = _digest(presented)
        found: Identity | None = None
        for known, identity in self._inline + self._from_file:
            if hmac.compare_digest(digest, known) and found is None:
                found = identity
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
            entries, problems = read_tokens_file(self._file)
        except OSError as exc:
            if self._file_stamp is not None or self._from_file:
                log.error("API tokens file %s unreadable (%s); its tokens are off", self._file, exc)
            self._from_file, self._file_stamp = (), None
            return
        for problem in problems:
            log.error("API tokens file %s: %s; that line's token is off", self._file, problem)
        self._from_file = self._known(entries)
        self._file_stamp = stamp
        log.info("API tokens file %s: %d token(s)", self._file, len(entries))


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class Guard:
    """Tokens and rate limits for one call; every transport asks it (the Flask hook, the
    inference fast path, the OpenAI routes, the gRPC service), so all enforce the same rules."""

    def __init__(self, store: TokenStore, limiter: RateLimiter | None) -> None:
        self.store = store
        self.limiter = limiter

    @property
    def active(self) -> bool:
        return self.store.enabled or self.limiter is not None

    def check(
        self,
        endpoint: str | None,
        scope: Scope | None,
        authorization: str | None,
        remote_addr: str | None,
    ) -> None:
        """Let the request in, or raise :class:`Unauthorized` (no valid token),
        :class:`Forbidden` (a valid token without ``scope``) or :class:`TooManyRequests`.

        ``endpoint`` is the route's operationId (public ones need no token; it names the
        rate-limit bucket); ``scope`` is what the route needs (``None``: any valid token).
        """
        store, limiter = self.store, self.limiter
        address = f"addr:{remote_addr or 'unknown'}"
        client = address
        identity: Identity | None = None
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
            client = identity.name
        if limiter is not None and endpoint is not None:
            limiter.check(client, endpoint)
        if identity is not None and scope is not None and scope not in identity.scopes:
            raise Forbidden(f"this token lacks the {scope!r} scope this endpoint needs")

    @classmethod
    def from_settings(cls, http: HttpSettings) -> Guard:
        """The guard for the tokens and rate limits of ``http``."""
        limiter = RateLimiter.from_settings(http.rate_limit) if http.rate_limited else None
        return cls(TokenStore.from_settings(http.auth), limiter)
