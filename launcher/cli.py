"""gemma-launch: fine-tune Gemma 3 on Cloud Run GPU jobs. Thin commands: parse, call, render."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from launcher import provision
from launcher.cloud import Clients
from launcher.errors import UserError
from launcher.settings import CONFIG_FILE, Settings, load_settings, template

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_STATUS_STYLE = {
    "created": "green",
    "updated": "yellow",
    "unchanged": "dim",
    "would create": "cyan",
    "would update": "cyan",
}


class Cli(click.Group):
    """Turns a UserError into `Error:` / `Hint:` lines and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UserError as error:
            err_console.print(f"[bold red]Error:[/] {error.message}", soft_wrap=True)
            if error.hint:
                err_console.print(f"[bold]Hint:[/] {error.hint}", soft_wrap=True)
            ctx.exit(2)


# (flag, settings field, click type, help); the help text comes from the Settings model where empty.
_SETTING_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--project", "project_id", str),
    ("--region", "region", str),
    ("--service-account", "service_account", str),
    ("--bucket", "bucket", str),
    ("--repository", "repository", str),
    ("--secret-id", "secret_id", str),
    ("--image", "image", str),
    ("--job", "job", str),
    ("--gpu", "gpu", click.Choice(["nvidia-rtx-pro-6000", "nvidia-l4"])),
    ("--cpu", "cpu", str),
    ("--memory", "memory", str),
    ("--task-timeout", "task_timeout", str),
    ("--max-retries", "max_retries", int),
    ("--network", "network", str),
    ("--subnet", "subnet", str),
    ("--vpc-egress", "vpc_egress", click.Choice(["all-traffic", "private-ranges-only"])),
    ("--model-id", "model_id", str),
)


def settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --config and one flag per setting; the command receives a validated `settings`."""

    @functools.wraps(command)
    def wrapper(*args: Any, config: Path | None, zonal_redundancy: bool | None, **kwargs: Any) -> Any:
        flags = {field: kwargs.pop(field) for _, field, _ in _SETTING_FLAGS}
        flags["gpu_zonal_redundancy"] = zonal_redundancy
        return command(*args, settings=load_settings(config, flags), **kwargs)

    for flag, field, kind in reversed(_SETTING_FLAGS):
        wrapper = click.option(flag, field, type=kind, help=Settings.model_fields[field].description)(wrapper)
    wrapper = click.option(
        "--zonal-redundancy/--no-zonal-redundancy",
        default=None,
        help=Settings.model_fields["gpu_zonal_redundancy"].description,
    )(wrapper)
    return click.option(
        "--config",
        type=click.Path(path_type=Path, dir_okay=False),
        help=f"Settings file (default: ./{CONFIG_FILE} when present).",
    )(wrapper)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gemma-launch")
def main() -> None:
    """Fine-tune Gemma 3 on Cloud Run Jobs GPUs (RTX PRO 6000 or L4).

    \b
    Typical session:
      export PROJECT_ID=my-project HF_TOKEN=hf_...
      gemma-launch init          # optional: write gemma-launch.toml
      gemma-launch up            # provision, stage weights, build, create the job
      gemma-launch run --follow  # fine-tune, streaming the logs

    Settings come from defaults < gemma-launch.toml < environment variables (PROJECT_ID, REGION,
    BUCKET_NAME, ...) < flags. Rehearse everything locally with `gemma-launch emulator start`.
    """


@main.command()
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
    console.print(f"Wrote {path}: set project_id, then run `gemma-launch up`.")


@main.command()
@settings_options
@click.option(
    "--dry-run", is_flag=True, help="Show the plan and the equivalent gcloud commands; change nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option("--skip-stage", is_flag=True, help="Do not stage model weights and data into the bucket.")
@click.option("--skip-build", is_flag=True, help="Do not build the image.")
def up(settings: Settings, dry_run: bool, as_json: bool, skip_stage: bool, skip_build: bool) -> None:
    """Provision everything the fine-tuning job needs; safe to run again.

    In order: service account, bucket (uniform access, in the job's region), storage.objectAdmin for
    the service account on that bucket only, Artifact Registry Docker repository, the HF_TOKEN
    secret (a new version only when the token changed), and secretAccessor on that secret only.
    Each line says created, updated or unchanged.
    """
    clients = Clients(settings.project_id)
    changes: list[provision.Change] = []

    def show(change: provision.Change) -> None:
        changes.append(change)
        if not as_json:
            style = _STATUS_STYLE.get(change.status, "")
            console.print(f"[{style}]{change.status:>12}[/]  {change.kind:<16} {change.name}")

    with console.status("Provisioning…", spinner="dots") if not as_json else nullcontext():
        provision.provision(clients, settings, dry_run=dry_run, on_change=show)
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "changes": [c.as_dict() for c in changes]}, indent=2))
        return
    if dry_run:
        commands = [change.command for change in changes if change.command]
        console.print(
            "\nDry run: nothing was changed." + (" Equivalent gcloud commands:" if commands else "")
        )
        for command in commands:
            click.echo(f"  {command}")
    elif all(change.status == "unchanged" for change in changes):
        console.print("\nEverything was already in place: nothing changed.")


@main.group()
def emulator() -> None:
    """A local stand-in for the Google Cloud APIs gemma-launch uses, for rehearsals and tests."""


@emulator.command("start")
@click.option("--port", type=int, default=0, show_default=True, help="gRPC port (0: a free one).")
@click.option("--storage-port", type=int, default=0, show_default=True, help="Storage port (0: a free one).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep state here across restarts (default: a new temporary directory).",
)
@click.option(
    "--faults", help="Inject errors, e.g. 'UNAVAILABLE=0.3,DEADLINE_EXCEEDED=0.05,lost=0.1,seed=7'."
)
@click.option(
    "--record",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Append every request as JSON lines here.",
)
def emulator_start(
    port: int, storage_port: int, data_dir: Path | None, faults: str | None, record: Path | None
) -> None:
    """Run the local cloud in the foreground until Ctrl-C.

    The first two lines are shell exports; `eval` them (or copy them) in the shell where you run
    gemma-launch, and every command talks to the emulator instead of Google Cloud.
    """
    from launcher.emulator.faults import Faults
    from launcher.emulator.server import Emulator

    try:
        Faults.parse(faults)
    except ValueError as error:
        raise UserError(
            f"Invalid --faults: {error}.", "Example: --faults 'UNAVAILABLE=0.3,lost=0.1,seed=7'."
        ) from None
    Emulator(port=port, storage_port=storage_port, data_dir=data_dir, faults=faults, record=record).serve()
