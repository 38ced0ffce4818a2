"""``tether fleet-agent``: run the fleet agent beside the edge server's worker processes."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from edge.settings import control_file_path, load_settings, needs_uplink
from shared.redaction import redact_url
from shared.shutdown import ShutdownSignals

log = logging.getLogger(__name__)


@click.command("fleet-agent")
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML settings file (the edge agent's).",
)
def fleet_agent_command(config_file: Path | None) -> None:
    """Install the model versions the cloud rolls out, and report this device's status.

    Switches the server's workers through the control file they share; stops on
    SIGTERM or Ctrl-C with a retained offline status.
    """
    from edge.fleet.agent import FleetAgent
    from edge.fleet.health_figures import FileShadowRates, MetricsHealthSource, shadow_rates_path
    from edge.fleet.target import ControlFileTarget
    from serving.control_file import ControlFile

    try:
        settings = load_settings(config_file)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    if not settings.fleet.public_keys():
        raise click.ClickException("fleet.trusted_keys is empty: no manifest could be trusted")
    stop = ShutdownSignals()
    stop.install()
    target = ControlFileTarget(ControlFile(control_file_path(settings)), settings.repository)
    # The workers answer the requests: their /metrics carry each version's health, and
    # the shadow rates reach them through a file (edge/fleet/health_figures.py). Only workers with
    # an uplink shadow-sample, so only then does a window wait for shadow samples.
    enabled = settings.uplink.enabled
    shadows = enabled or (enabled is None and needs_uplink(settings.routes))
    agent = FleetAgent(
        settings,
        target,
        health=MetricsHealthSource.from_settings(settings),
        shadow_rates=FileShadowRates(shadow_rates_path(settings)) if shadows else None,
    )
    agent.start(connect_wait_s=None)
    log.info(
        "fleet agent %s running (broker %s)", settings.device_id, redact_url(settings.mqtt_url)
    )
    stop.wait()
    agent.stop()
