"""`gemma-launch init`: write a commented gemma-launch.toml."""

from __future__ import annotations

from pathlib import Path

import click

from launcher.commands.options import Command
from launcher.commands.render import console
from launcher.errors import UserError
from launcher.settings import CONFIG_FILE
from launcher.settings_sources import template


@click.command("init", cls=Command)
@click.option(
    "--path", type=click.Path(path_type=Path, dir_okay=False), default=Path(CONFIG_FILE), show_default=True
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented gemma-launch.toml with every setting and its default."""
    if path.exists() and not force:
        raise UserError(
            f"{path} already exists.", "Edit it, or pass --force to overwrite it with the defaults."
        )
    path.write_text(template())
    console.print(
        f"Wrote {path}: uncomment project_id and set it to your project (or export PROJECT_ID), then run "
        "`gemma-launch up`."
    )
