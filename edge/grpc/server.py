"""The gRPC server one edge worker runs beside its HTTP app (``grpc.port``, default 8001).

Started in each worker after the fork (gRPC must not cross a fork) by the agent
(:func:`edge.worker.worker_app`), over the worker's own data plane and security guard, so HTTP and gRPC share models, metrics, tokens and rate
limits. With several workers each binds the port with ``SO_REUSEPORT`` and the kernel
spreads connections, as for HTTP; with one worker the port is bound exclusively, so a
second agent on the same port fails loudly instead of sharing it.
"""

from __future__ import annotations

import atexit
import logging
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from edge.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from edge.grpc.service import InferenceService
from edge.settings import EdgeSettings
from serving.dataplane import DataPlane
from shared.codec import TensorLimits
from shared.netaddr import bracket

if TYPE_CHECKING:
    from edge.access.guard import Guard

log = logging.getLogger(__name__)


class GrpcPortUnavailable(RuntimeError):
    """The configured gRPC address could not be bound."""


def start_grpc_server(
    settings: EdgeSettings, plane: DataPlane, guard: Guard | None, limits: TensorLimits
) -> grpc.Server:
    """Serve ``GRPCInferenceService`` over ``plane``, checking calls with ``guard`` (the
    same one the worker's HTTP app asks); returns the started server."""
    http = settings.http
    service = InferenceService(plane, guard, limits)
    options = [
        ("grpc.max_receive_message_length", http.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 1 if http.workers > 1 else 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=settings.request_threads(), thread_name_prefix="grpc"
        ),
        options=options,
        maximum_concurrent_rpcs=settings.grpc.max_concurrent_rpcs,
    )
    add_GRPCInferenceServiceServicer_to_server(service, server)
    address = f"{bracket(settings.grpc_host())}:{settings.grpc.port}"
    tls = http.tls
    try:
        if tls.enabled:
            assert tls.cert_file is not None and tls.key_file is not None
            credentials = grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())]
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise GrpcPortUnavailable(f"cannot bind gRPC on {address}: {exc}") from exc
    if port == 0:
        raise GrpcPortUnavailable(f"cannot bind gRPC on {address} (in use?)")
    server.start()
    atexit.register(server.stop, 1.0)
    log.info("gRPC (KServe V2) on %s%s", address, " with TLS" if tls.enabled else "")
    return server
