"""Open Inference Protocol (KServe V2) message types, versioned.

These types are the contract: the HTTP API, the MQTT envelopes and the JSON Schema files
under ``shared/schemas/`` all come from them. Every type carries a ``schema_version``;
readers ignore unknown fields and apply :func:`shared.versioning.check_readable`.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.errors import InvalidInput
from shared.versioning import SchemaVersion, check_readable

#: The version of the V2 HTTP message types this code writes.
PROTOCOL_SCHEMA = SchemaVersion(1, 0)

Parameters = dict[str, Any]

M = TypeVar("M", bound="VersionedModel")


class VersionedModel(BaseModel):
    """Base of every message type: carries ``schema_version``, ignores unknown fields."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    #: The version this code writes; subclasses override.
    SCHEMA: ClassVar[SchemaVersion] = PROTOCOL_SCHEMA

    schema_version: str | None = Field(
        default=None,
        description="MAJOR.MINOR version of this message's schema; absent means the reader's own.",
    )

    @classmethod
    def parse(cls: type[M], raw: bytes | str | dict[str, Any]) -> M:
        """Decode and validate a message, applying the version rule; errors are InvalidInput."""
        if isinstance(raw, (bytes, str)):
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise InvalidInput(f"malformed JSON: {exc}") from None
        else:
            data = raw
        if not isinstance(data, dict):
            raise InvalidInput(f"{cls.__name__} must be a JSON object")
        check_readable(data.get("schema_version"), cls.SCHEMA, cls.__name__)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInput(f"invalid {cls.__name__}: {describe(exc)}") from None

    def dump(self) -> dict[str, Any]:
        """The message as JSON-ready data, stamped with this code's schema version."""
        body = self.model_dump(exclude_none=True)
        body["schema_version"] = str(self.SCHEMA)
        return body


def describe(exc: ValidationError) -> str:
    """A one-line, user-readable summary of a pydantic validation error."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class RequestInput(VersionedModel):
    """One input tensor of an inference request."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: Any = Field(default=None, description="Row-major tensor data; nested or flat.")


class RequestOutput(VersionedModel):
    """An output the client asks for (``parameters.binary_data`` for the binary extension)."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(VersionedModel):
    """``POST /v2/models/{m}[/versions/{v}]/infer`` request body."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(VersionedModel):
    """One output tensor of an inference response."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: Any = None


class InferenceResponse(VersionedModel):
    """Inference response; ``parameters`` carries Tether's provenance (``served_by``...)."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(VersionedModel):
    """The error body on every transport."""

    error: str


class ServerMetadata(VersionedModel):
    """``GET /v2``."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(VersionedModel):
    """An input or output in model metadata."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(VersionedModel):
    """``GET /v2/models/{m}[/versions/{v}]``."""

    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = None


class RepositoryIndexEntry(VersionedModel):
    """One row of ``POST /v2/repository/index``."""

    name: str
    version: str | None = None
    state: str
    reason: str = ""


#: Every HTTP message type, for JSON Schema generation.
HTTP_MESSAGE_TYPES: tuple[type[VersionedModel], ...] = (
    InferenceRequest,
    InferenceResponse,
    ErrorResponse,
    ServerMetadata,
    ModelMetadata,
    RepositoryIndexEntry,
)
