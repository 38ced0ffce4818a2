"""The Open Inference Protocol's ``GRPCInferenceService``: a thin transport over the data plane.

Each RPC checks the caller with the same :class:`~edge.access.guard.Guard` as HTTP (bearer
token in the ``authorization`` metadata, the route's scope, the rate limit bucket of the
matching HTTP endpoint), turns the protobuf request into what the data plane takes, and the
answer back into protobuf. A :class:`~shared.errors.TetherError` becomes the gRPC status
that matches its HTTP status (:data:`STATUS_CODES`), with ``retry-after`` and
``www-authenticate`` in the trailing metadata where HTTP sends those headers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np

from edge.access.guard import CHALLENGE, Guard
from edge.access.tokens import ADMIN, INFER, Scope
from edge.grpc import grpc_predict_v2_pb2 as pb
from edge.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceServicer
from serving.dataplane import DataPlane
from shared.codec import (
    DecodedRequest,
    OutputRequest,
    TensorLimits,
    deserialize_bytes,
    tensor_bytes,
)
from shared.datatypes import element_size, from_numpy_dtype, to_numpy_dtype
from shared.errors import (
    InternalError,
    InvalidInput,
    TetherError,
    TooManyRequests,
    Unauthorized,
)
from shared.tracing import clean_request_id, set_request_id

log = logging.getLogger(__name__)

#: HTTP status of a Tether error -> the gRPC status code clients expect for it.
STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

#: Which typed ``InferTensorContents`` field carries each datatype (FP16/BF16: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

REQUEST_ID_KEY = "x-request-id"

Reply = TypeVar("Reply")


def status_code(error: TetherError) -> grpc.StatusCode:
    """The gRPC status for ``error`` (INTERNAL for any status without its own code)."""
    return STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL)


class InferenceService(GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` answered by one data plane under one guard."""

    def __init__(self, plane: DataPlane, guard: Guard | None, limits: TensorLimits) -> None:
        self.plane = plane
        self.guard = guard if guard is not None and guard.active else None
        self.limits = limits

    # ------------------------------------------------------------------ health & metadata

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call(context, "server_live", None, lambda: pb.ServerLiveResponse(live=True))

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call(
            context,
            "server_ready",
            None,
            lambda: pb.ServerReadyResponse(ready=self.plane.ready()),
        )

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            meta = self.plane.server_metadata()
            return pb.ServerMetadataResponse(
                name=meta["name"], version=meta["version"], extensions=meta["extensions"]
            )

        return self._call(context, "server_metadata", INFER, answer)

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._call(
            context,
            "model_ready",
            INFER,
            lambda: pb.ModelReadyResponse(
                ready=self.plane.model_ready(request.name, request.version or None)
            ),
        )

    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            meta = self.plane.model_metadata(request.name, request.version or None)
            return pb.ModelMetadataResponse(
                name=meta["name"],
                versions=meta.get("versions", []),
                platform=meta.get("platform", ""),
                inputs=[_tensor_metadata(t) for t in meta.get("inputs", [])],
                outputs=[_tensor_metadata(t) for t in meta.get("outputs", [])],
            )

        return self._call(context, "model_metadata", INFER, answer)

    # ------------------------------------------------------------------ inference

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            started = time.perf_counter()
            name, version = request.model_name, request.model_version or None
            runtime = self.plane.resolve_for_request(name, version)
            try:
                decoded = decode_infer_request(request, self.limits)
            except TetherError as exc:
                self.plane.count_failure(name, exc)
                raise
            prediction = self.plane.infer(name, version, decoded, started, runtime)
            return encode_infer_response(
                name, prediction.model_version, request.id, prediction.outputs,
                prediction.provenance.parameters(), decoded.outputs,
            )  # fmt: skip

        return self._call(context, "infer", INFER, answer)

    # ------------------------------------------------------------------ repository

    def RepositoryIndex(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            entries = self.plane.repository_index()
            if request.ready:
                entries = [e for e in entries if e.get("state") == "READY"]
            return pb.RepositoryIndexResponse(
                models=[
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=e.get("name", ""),
                        version=str(e.get("version", "")),
                        state=e.get("state", ""),
                        reason=e.get("reason", ""),
                    )
                    for e in entries
                ]
            )

        return self._call(context, "repository_index", ADMIN, answer)

    def RepositoryModelLoad(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            self.plane.load_model(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return self._call(context, "repository_load", ADMIN, answer)

    def RepositoryModelUnload(self, request: Any, context: grpc.ServicerContext) -> Any:
        def answer() -> Any:
            self.plane.unload_model(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return self._call(context, "repository_unload", ADMIN, answer)

    # ------------------------------------------------------------------ one call

    def _call(
        self,
        context: grpc.ServicerContext,
        endpoint: str,
        scope: Scope | None,
        answer: Callable[[], Reply],
    ) -> Reply:
        """Run ``answer`` under the request id and the guard; errors become gRPC statuses."""
        metadata = {key: value for key, value in context.invocation_metadata()}
        request_id = clean_request_id(_text(metadata.get(REQUEST_ID_KEY)))
        set_request_id(request_id)
        context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
        try:
            if self.guard is not None:
                self.guard.check(
                    endpoint, scope, _text(metadata.get("authorization")), _peer(context.peer())
                )
            return answer()
        except TetherError as exc:
            _abort(context, exc)
        except Exception:
            log.exception("unexpected error in gRPC %s", endpoint)
            _abort(context, InternalError(f"internal error: {endpoint}"))
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _abort(context: grpc.ServicerContext, exc: TetherError) -> None:
    """End the call with ``exc``'s status, message and HTTP-equivalent trailers."""
    if exc.status >= 500:
        log.warning("gRPC request failed: %s", exc.message)
    trailers: list[tuple[str, str]] = []
    if isinstance(exc, TooManyRequests):
        trailers.append(("retry-after", str(max(1, math.ceil(exc.retry_after)))))
    if isinstance(exc, Unauthorized):
        trailers.append(("www-authenticate", CHALLENGE))
    if trailers:
        context.set_trailing_metadata(tuple(trailers))
    context.abort(status_code(exc), exc.message)


def _text(value: str | bytes | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _peer(peer: str) -> str | None:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address alone."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return rest or None


def _tensor_metadata(tensor: Mapping[str, Any]) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor["name"], datatype=tensor["datatype"], shape=list(tensor["shape"])
    )


# --------------------------------------------------------------------------- decoding


def decode_infer_request(request: Any, limits: TensorLimits) -> DecodedRequest:
    """A ``ModelInferRequest`` as the data plane takes it (raw or typed contents).

    Raw contents are viewed in place (no copy); their size must match the declared shape
    exactly, checked before anything is materialised.
    """
    count = len(request.inputs)
    if count > limits.max_inputs:
        raise InvalidInput(f"request has {count} inputs, over the limit of {limits.max_inputs}")
    raw = request.raw_input_contents
    if raw and len(raw) != count:
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {count} inputs (one per input)"
        )
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype = tensor.name, tensor.datatype
        if name in inputs:
            raise InvalidInput(f"input {name!r} appears twice")
        shape = tuple(int(d) for d in tensor.shape)
        elements = _element_count(name, shape, limits)
        dtype = to_numpy_dtype(datatype)
        if raw:
            array = _from_raw(name, datatype, dtype, elements, raw[index])
        else:
            array = _from_contents(name, datatype, dtype, elements, tensor)
        inputs[name] = array.reshape(shape)
        datatypes[name] = datatype
    outputs = [OutputRequest(o.name, True) for o in request.outputs] or None
    parameters = {key: _parameter(value) for key, value in request.parameters.items()}
    return DecodedRequest(inputs, datatypes, request.id or None, parameters, outputs)


def _element_count(name: str, shape: tuple[int, ...], limits: TensorLimits) -> int:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r} has a negative dimension in shape {list(shape)}")
    count = 1
    for dim in shape:
        count *= dim
        if count > limits.max_elements:
            raise InvalidInput(
                f"input {name!r} has more than {limits.max_elements} elements (shape {list(shape)})"
            )
    return count


def _from_raw(name: str, datatype: str, dtype: np.dtype, count: int, data: bytes) -> np.ndarray:
    if datatype == "BYTES":
        array = deserialize_bytes(data)
        if array.size != count:
            raise InvalidInput(
                f"input {name!r} has {array.size} BYTES elements, shape says {count}"
            )
        return array
    expected = count * element_size(datatype)
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r} has {len(data)} bytes of raw contents, its shape and datatype "
            f"need {expected}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)


def _from_contents(
    name: str, datatype: str, dtype: np.dtype, count: int, tensor: Any
) -> np.ndarray:
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: {datatype} travels in raw_input_contents only")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r} has {len(values)} elements in contents.{field}, its shape says {count}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array
    try:
        return np.asarray(values, dtype=dtype)
    except OverflowError:
        raise InvalidInput(f"input {name!r} has values out of range for {datatype}") from None


def _parameter(value: Any) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


# --------------------------------------------------------------------------- encoding


def encode_infer_response(
    model: str,
    version: str,
    request_id: str,
    outputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any],
    requested: list[OutputRequest] | None,
) -> Any:
    """A ``ModelInferResponse`` with every output as raw contents (as Triton answers)."""
    names = [o.name for o in requested] if requested else list(outputs)
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for key, value in parameters.items():
        param = _infer_parameter(value)
        if param is not None:
            response.parameters[key].CopyFrom(param)
    for name in names:
        array = outputs[name]
        datatype = _datatype(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        response.raw_output_contents.append(tensor_bytes(array, datatype))
    return response


def _datatype(array: np.ndarray) -> str:
    return "BYTES" if array.dtype == object else from_numpy_dtype(array.dtype)


def _infer_parameter(value: Any) -> Any:
    """A provenance value as an ``InferParameter`` (lists and dicts are left out)."""
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    return None
