"""``tether bridge``: run the MQTT sensor bridge (``python -m edge.bridge_cli`` works too)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edge.settings import load_settings
from shared.shutdown import ShutdownSignals


@click.command("bridge")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file (the agent's; the bridge reads its [sensors] section).",
)
def bridge_command(config_file: Path | None) -> None:
    """Answer sensor readings on the device broker with inference results (docs/sensors.md)."""
    from edge.sensors.bridge import SensorBridge

    try:
        settings = load_settings(config_file)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    bridge = SensorBridge(settings)
    stopping = ShutdownSignals()
    stopping.install()
    bridge.start()
    click.echo(f"sensor bridge running (metrics port {bridge.metrics_port})", err=True)
    stopping.wait()
    bridge.stop()


if __name__ == "__main__":
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bridge_command()
