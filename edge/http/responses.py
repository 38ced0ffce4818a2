"""Building HTTP responses fast: orjson bodies without Flask's JSON provider."""

from __future__ import annotations

from typing import Any

import orjson
from flask import Response

from shared.codec import BINARY_CONTENT_TYPE, HEADER_LENGTH_HEADER, JSON_CONTENT_TYPE


def json_response(body: Any, status: int = 200) -> Response:
    """A JSON response serialised with orjson (numpy arrays allowed)."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type=JSON_CONTENT_TYPE,
    )


def tensor_response(payload: bytes, header_length: int | None) -> Response:
    """An inference response: plain JSON, or JSON header + binary tensors."""
    if header_length is None:
        return Response(payload, content_type=JSON_CONTENT_TYPE)
    response = Response(payload, content_type=BINARY_CONTENT_TYPE)
    response.headers[HEADER_LENGTH_HEADER] = str(header_length)
    return response
