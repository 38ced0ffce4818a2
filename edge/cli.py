"""``tether edge``: run the edge agent."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from edge.settings import EdgeSettings, load_settings

if TYPE_CHECKING:
    from flask import Flask

    from edge.http.server import RunState


@click.command("edge")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file.",
)
@click.option("--host", help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, help="Port to bind (default 8000).")
@click.option(
    "--repository",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model repository folder (default models/repository).",
)
@click.option("--workers", type=int, help="Server worker processes (default 1).")
@click.option(
    "--grpc-port",
    type=click.IntRange(0, 65535),
    help="Port of the KServe V2 gRPC API (default 8001; 0 turns it off).",
)
def edge_command(
    config_file: Path | None,
    host: str | None,
    port: int | None,
    repository: Path | None,
    workers: int | None,
    grpc_port: int | None,
) -> None:
    """Serve the model repository over the Open Inference Protocol (KServe V2), HTTP and gRPC."""
    from edge.http.server import serve

    given = {"host": host, "port": port, "workers": workers}
    http = {k: v for k, v in given.items() if v is not None}
    try:
        settings = load_settings(
            config_file,
            repository=repository,
            http=http or None,
            grpc=None if grpc_port is None else {"port": grpc_port},
        )
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    serve(settings, _worker_app)


def _worker_app(settings: EdgeSettings, state: RunState) -> Flask:
    """Build one server worker's app, after the fork. The import waits until then: the
    server process imports no runtime or metrics code (prometheus_client must see
    ``PROMETHEUS_MULTIPROC_DIR``, which the server sets, before its first import)."""
    from edge.worker import worker_app

    return worker_app(settings, state)
