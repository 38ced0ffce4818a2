"""The ``tether`` command: one entry point whose subcommands live with their packages."""

from __future__ import annotations

import logging

import click

from edge.cli import edge_command
from shared import __version__
from tether.up import up_command


@click.group()
@click.version_option(__version__, prog_name="tether")
@click.option("--log-level", default="INFO", show_default=True, help="Logging level.")
def cli(log_level: str) -> None:
    """Tether: edge-and-cloud hybrid inference."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


cli.add_command(edge_command)
cli.add_command(up_command)


def _add_optional_commands() -> None:
    try:
        from models.cli import models_group
    except ImportError:  # the models build lives in the source tree, not every install
        return
    cli.add_command(models_group)


_add_optional_commands()


def main() -> None:
    """Console-script entry point."""
    cli()
