"""The one error hierarchy of Tether.

Every error a user can see is a :class:`TetherError`. Each carries the HTTP status it maps
to, and renders the same body on every transport: ``{"error": "..."}`` for HTTP responses
and MQTT error replies alike.
"""

from __future__ import annotations

from typing import Any


class TetherError(Exception):
    """Base of every error Tether reports to a caller."""

    status: int = 500
    reason: str = "internal"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def to_body(self) -> dict[str, Any]:
        """The error body every transport sends: ``{"error": message}``."""
        return {"error": self.message}


class InvalidInput(TetherError):
    """The request is malformed: bad JSON, shape, datatype, data length or values."""

    status = 400
    reason = "invalid_input"


class SchemaVersionError(InvalidInput):
    """A message carries a schema version this reader does not speak."""

    reason = "schema_version"


class Unauthorized(TetherError):
    """The caller did not prove who it is."""

    status = 401
    reason = "unauthorized"


class Forbidden(TetherError):
    """The caller is known but may not do this."""

    status = 403
    reason = "forbidden"


class NotFound(TetherError):
    """An unknown model, model version or route."""

    status = 404
    reason = "not_found"


class ModelNotFound(NotFound):
    """No such model or model version in the repository."""


class PayloadTooLarge(TetherError):
    """The request body or a tensor is over the configured limit."""

    status = 413
    reason = "too_large"


class TooManyRequests(TetherError):
    """A rate limit or queue limit was hit; ``retry_after`` says when to try again."""

    status = 429
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InternalError(TetherError):
    """A bug or an unexpected failure inside Tether or a runtime."""

    status = 500
    reason = "internal"


class Unsupported(TetherError):
    """A feature or datatype this server does not implement."""

    status = 501
    reason = "unsupported"


class Unavailable(TetherError):
    """Not ready, not loaded, overloaded, or a remote (cloud) service unreachable."""

    status = 503
    reason = "unavailable"


class ModelNotReady(Unavailable):
    """The model exists but is not loaded and warmed up."""

    reason = "not_ready"


class DeadlineExceeded(Unavailable):
    """The request's deadline passed before an answer came."""

    status = 504
    reason = "deadline"


class SignatureError(TetherError):
    """A signed manifest or artifact failed verification."""

    status = 400
    reason = "signature"
