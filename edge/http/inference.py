"""One inference request from WSGI environ to response bytes, shared by the Flask view and
the fast path, so both decode, validate, run and encode the same way."""

from __future__ import annotations

import time
from typing import Any

from serving.dataplane import DataPlane
from shared.codec import HEADER_LENGTH_HEADER, TensorLimits, decode_request, encode_response
from shared.errors import InvalidInput, PayloadTooLarge, TetherError

_HEADER_LENGTH_KEY = "HTTP_" + HEADER_LENGTH_HEADER.upper().replace("-", "_")


def infer_body(
    plane: DataPlane,
    environ: dict[str, Any],
    model: str,
    version: str | None,
    limits: TensorLimits,
    max_body_bytes: int | None,
) -> tuple[bytes, int | None]:
    """Answer one inference request: the response body and its JSON header length
    (``None`` for a plain JSON body). Errors are Tether errors."""
    started = time.perf_counter()
    runtime = plane.resolve_for_request(model, version)  # unknown model: 404 whatever the body
    try:
        # checked against the model's inputs before any tensor is built (shared/codec.py)
        decoded = decode_request(
            read_body(environ, max_body_bytes), header_length(environ), limits, runtime
        )
    except TetherError as exc:
        plane.count_failure(model, exc)
        raise
    prediction = plane.infer(model, version, decoded, started, runtime)
    return encode_response(
        model_name=model,
        model_version=prediction.model_version,
        outputs=prediction.outputs,
        request_id=decoded.id,
        parameters=prediction.provenance.parameters(),
        requested=decoded.outputs,
        binary_default=decoded.binary_output_default,
    )


def header_length(environ: dict[str, Any]) -> int | None:
    """``Inference-Header-Content-Length``, when the body carries binary tensors."""
    raw = environ.get(_HEADER_LENGTH_KEY)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise InvalidInput(f"{HEADER_LENGTH_HEADER} must be an integer") from None


def read_body(environ: dict[str, Any], limit: int | None) -> bytes:
    """The request body, within ``limit`` bytes (413 past it), chunked or not."""
    stream = environ["wsgi.input"]
    raw = environ.get("CONTENT_LENGTH")
    if not raw:
        if environ.get("HTTP_TRANSFER_ENCODING", "").lower() != "chunked":
            return b""
        cap = (limit or 0) + 1 if limit is not None else -1
        body: bytes = stream.read(cap) if cap > 0 else stream.read()
        if limit is not None and len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        return body
    try:
        length = int(raw)
    except ValueError:
        raise InvalidInput("Content-Length must be an integer") from None
    if limit is not None and length > limit:
        raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    body = stream.read(length)
    if len(body) != length:
        raise InvalidInput(f"body ended after {len(body)} of {length} bytes")
    return body
