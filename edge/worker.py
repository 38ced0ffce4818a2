"""One server worker of the edge API: the HTTP app (V2 and ``/v1``) and the gRPC server
it serves, both over one :class:`~edge.agent.EdgeAgent`'s data plane and access guard.

This is where the transports are put together; a new transport is started here
(docs/architecture.md). The sensor bridge is its own process over its own agent.
"""

from __future__ import annotations

import atexit
from pathlib import Path
from typing import TYPE_CHECKING

from flask import Flask

from edge.agent import EdgeAgent
from edge.http.app import create_app
from edge.http.auth import install_security
from edge.settings import EdgeSettings
from serving.control_file import ControlFile

if TYPE_CHECKING:
    from edge.http.server import RunState

AGENT_KEY = "tether.agent"
GRPC_KEY = "tether.grpc"


def http_app(agent: EdgeAgent) -> Flask:
    """The agent's HTTP app, with the token guard and rate limits the settings ask for."""
    from edge.openai.metrics import TextMetrics
    from edge.openai.routes import install_openai
    from edge.openai.serving import OpenAIServing

    http = agent.settings.http
    app = create_app(
        agent.dataplane,
        max_body_bytes=http.max_body_bytes,
        limits=agent.limits,
        access_log=http.access_log,
        fast_path=http.fast_path,
    )
    install_security(app, agent.guard)  # tokens and rate limits (docs/security.md)
    text_metrics = TextMetrics(agent.metrics.registry)
    install_openai(app, OpenAIServing(agent.text_router, text_metrics))  # /v1 (docs/openai.md)
    app.extensions[AGENT_KEY] = agent
    return app


def build_app(
    settings: EdgeSettings,
    *,
    control: ControlFile | None = None,
    multiprocess_dir: Path | None = None,
) -> Flask:
    """Build a started agent and return its Flask app (used by the server and tests)."""
    agent = EdgeAgent(settings, control=control, multiprocess_dir=multiprocess_dir)
    agent.start()
    atexit.register(agent.close)
    return http_app(agent)


def worker_app(settings: EdgeSettings, state: RunState) -> Flask:
    """The app one server worker serves, built in the worker after the fork, with the
    worker's other transports beside it over the same data plane and guard: the gRPC
    service (``grpc.port``) when it is on."""
    app = build_app(settings, control=state.control, multiprocess_dir=state.metrics_dir)
    if settings.grpc.enabled:
        from edge.grpc.server import start_grpc_server

        agent: EdgeAgent = app.extensions[AGENT_KEY]
        app.extensions[GRPC_KEY] = start_grpc_server(
            settings, agent.dataplane, agent.guard, agent.limits
        )
    return app
