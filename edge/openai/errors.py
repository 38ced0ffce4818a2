"""Tether errors rendered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

The status is the error's own (the one error hierarchy); only the body differs from V2's.
"""

from __future__ import annotations

from typing import Any

from shared.errors import TetherError

#: OpenAI's error ``type`` for each status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
#: A ``code`` for errors that carry none of their own, by Tether's reason.
_CODES = {
    "unauthorized": "invalid_api_key",
    "rate_limited": "rate_limit_exceeded",
    "not_found": "model_not_found",
    "too_large": "request_too_large",
    "deadline": "timeout",
    "unavailable": "service_unavailable",
    "not_ready": "model_not_ready",
    "stream_broken": "stream_broken",
    "cloud_unreachable": "service_unavailable",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object for ``status`` and ``message``."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_body(exc: TetherError) -> dict[str, Any]:
    """The OpenAI error object of a Tether error (its ``param`` and ``code`` when it has them)."""
    param = getattr(exc, "param", None)
    code = getattr(exc, "code", None) or _CODES.get(exc.reason)
    if exc.reason == "context_length_exceeded":
        code, param = "context_length_exceeded", param or "messages"
    return openai_error(exc.status, exc.message, param=param, code=code)
