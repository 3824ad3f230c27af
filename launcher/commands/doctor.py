"""`gemma-launch doctor`: the read-only checks, one line each, or --json."""

from __future__ import annotations

import dataclasses
import json

import click
from rich.markup import escape

from launcher import doctor
from launcher.cloud import Clients
from launcher.commands.options import Command, settings_options
from launcher.commands.render import console
from launcher.errors import UserError
from launcher.settings import Settings


@click.command("doctor", cls=Command)
@settings_options(gpu_region=False)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(settings: Settings, as_json: bool) -> None:
    """Check, changing nothing, what `up` and `run` need; exit 0 only when every check passes.

    \b
    One line per check, ✓ or ✗ with its fix:
      credentials and their account; the project and its billing; the APIs gemma-launch calls; the
      permissions `up` uses; the GPU type in the region, and usable by the image; the GPU quota; the
      build location; the bucket name (free, or already this project's); the job's and the build's
      service accounts (one deleted after `up` stops `run`).
    On a new project some checks need APIs that are still off: they fail as "cannot check until" the
    API is enabled, which `gemma-launch up` does first.
    """
    checks = doctor.run_checks(Clients(settings.project_id), settings)
    failed = [check for check in checks if not check.passed]
    if as_json:
        document = {"ok": not failed, "checks": [dataclasses.asdict(check) for check in checks]}
        click.echo(json.dumps(document, indent=2))
    else:
        width = max(len(title) for title in doctor.TITLES.values())
        for check in checks:
            mark = "[green]✓[/]" if check.passed else "[red]✗[/]"
            fix = f"  Fix: {escape(check.fix)}" if check.fix and not check.passed else ""
            console.print(
                f"{mark} [bold]{doctor.TITLES[check.name]:<{width}}[/] {escape(check.detail)}{fix}",
                soft_wrap=True,
            )
    if failed:
        raise UserError(
            f"{len(failed)} of {len(checks)} checks failed: "
            f"{', '.join(doctor.TITLES[check.name] for check in failed)}.",
            "Apply the fix named on each ✗ line, then run `gemma-launch doctor` again.",
        )
