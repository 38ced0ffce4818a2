"""``tether cloud``: run one cloud inference worker in the foreground until SIGTERM or SIGINT.

The first signal drains (no new requests; queued and running ones are answered, then the
process exits 0); a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import click

from cloud.settings import CloudSettings, load_cloud_settings
from shared.errors import TetherError
from shared.shutdown import ShutdownSignals

log = logging.getLogger(__name__)


@click.command("cloud")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file.",
)
@click.option("--mqtt-url", help="MQTT broker URL (default: TETHER_MQTT_URL or localhost).")
@click.option(
    "--repository",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model repository folder (default models/repository).",
)
@click.option("--models", help="Comma-separated models to serve.")
@click.option("--worker-id", help="MQTT client id of this worker (default host-pid).")
@click.option("--metrics-port", type=int, help="Prometheus port (default 9100; 0 turns it off).")
def cloud_command(
    config_file: Path | None,
    mqtt_url: str | None,
    repository: Path | None,
    models: str | None,
    worker_id: str | None,
    metrics_port: int | None,
) -> None:
    """Serve cloud inference requests from the edge over MQTT (a shared subscription)."""
    try:
        settings = load_cloud_settings(
            config_file,
            mqtt_url=mqtt_url,
            repository=repository,
            models=models,
            worker_id=worker_id,
            metrics_port=metrics_port,
        )
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        run_worker(settings)
    except TetherError as exc:
        raise click.ClickException(exc.message) from exc


def run_worker(settings: CloudSettings) -> None:
    """Start a worker, wait for SIGTERM/SIGINT, drain it; a second signal exits at once."""
    from cloud.worker import CloudWorker

    def on_signal(signum: int, count: int) -> None:
        if count > 1:  # no logging here: a handler must not take locks (shared/shutdown.py)
            os.write(
                2, f"second {signal.Signals(signum).name}: exiting without draining\n".encode()
            )
            os._exit(128 + signum)

    worker = CloudWorker(settings)
    with ShutdownSignals(on_signal=on_signal) as stop:
        worker.start()
        stop.wait()
        if stop.last is not None:
            log.info("%s: draining", signal.Signals(stop.last).name)
        worker.stop(drain=True)


if __name__ == "__main__":
    cloud_command()
