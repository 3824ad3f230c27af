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
    "--path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path(CONFIG_FILE),
    show_default=True,
    help=f"Where to write it. Commands read ./{CONFIG_FILE}, or the file their --config names.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented gemma-launch.toml with every setting and its default."""
    if path.exists() and not force:
        raise UserError(
            f"{path} already exists.", "Edit it, or pass --force to overwrite it with the defaults."
        )
    path.parent.mkdir(parents=True, exist_ok=True)  # as `report --out` makes its directory
    path.write_text(template())
    # Elsewhere than ./gemma-launch.toml, only --config reads it: the next command must name it.
    read = "" if path.resolve() == Path(CONFIG_FILE).resolve() else f" --config {path}"
    console.print(
        f"Wrote {path}: uncomment project_id and set it to your project (or export PROJECT_ID), then run "
        f"`gemma-launch up{read}`.",
        markup=False,
        soft_wrap=True,
    )
