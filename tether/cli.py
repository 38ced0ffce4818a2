"""The ``tether`` command: one entry point whose subcommands live with their packages.

Subcommands are imported only when used, so ``tether edge`` (whose process becomes the
HTTP server's master) does not carry the cloud worker's or the trainer's imports.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from shared import __version__
from shared.tracing import configure_logging

#: command name -> "module:attribute" of its click command.
COMMANDS: dict[str, str] = {
    "edge": "edge.cli:edge_command",
    "cloud": "cloud.cli:cloud_command",
    "up": "tether.up:up_command",
    "models": "models.cli:models_group",
    "calibrate": "tether.calibrate_cli:calibrate_command",
    "fleet": "cloud.fleet_cli:fleet_group",
    "status": "edge.status:status_command",
    "bridge": "edge.bridge_cli:bridge_command",
    "fleet-agent": "edge.fleet_cli:fleet_agent_command",
}


class LazyGroup(click.Group):
    """A click group that imports each subcommand's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise click.ClickException(
                f"`tether {cmd_name}` is not available in this install: {exc}"
            ) from exc
        command: Any = getattr(module, attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="tether")
@click.option("--log-level", default="INFO", show_default=True, help="Logging level.")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "text"]),
    default="auto",
    show_default=True,
    envvar="TETHER_LOG_FORMAT",
    help="JSON lines, or text; auto is text on a terminal and JSON otherwise.",
)
def cli(log_level: str, log_format: str) -> None:
    """Tether: edge-and-cloud hybrid inference."""
    configure_logging(log_level, log_format)


def main() -> None:
    """Console-script entry point."""
    cli()
