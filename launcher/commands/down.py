"""`gemma-launch down`: remove what `up` made, keeping the bucket unless asked; safe to run again."""

from __future__ import annotations

import json

import click

from launcher import down as teardown
from launcher.changes import Change
from launcher.cloud import Clients
from launcher.commands.options import Command, settings_options
from launcher.commands.render import console, err_console, print_change
from launcher.errors import UserError
from launcher.settings import Settings

# What `down` reads and deletes: everything `up` made, found by the same names.
DOWN_SETTINGS = (
    "project_id",
    "region",
    "service_account",
    "build_service_account",
    "bucket",
    "repository",
    "secret_id",
    "job",
)


@click.command("down", cls=Command)
@settings_options(gpu_region=False, fields=DOWN_SETTINGS)
@click.option(
    "--delete-bucket",
    is_flag=True,
    help="Delete the bucket too, with the weights, data and results in it (asks you to type its name).",
)
@click.option("--yes", is_flag=True, help="With --delete-bucket: do not ask for the bucket's name.")
@click.option("--force", is_flag=True, help="Cancel a running execution first instead of refusing.")
@click.option(
    "--dry-run", is_flag=True, help="Show what would be deleted and the gcloud commands; delete nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def down(
    settings: Settings, delete_bucket: bool, yes: bool, force: bool, dry_run: bool, as_json: bool
) -> None:
    """Remove what `up` made; safe to run again.

    \b
    One line per resource, deleted, absent or kept: the job and the staging job with their
    executions, every binding `up` granted, the repository with its images, the HF_TOKEN secret with
    its versions, and the two service accounts. The bucket (weights, data, results) is kept unless
    --delete-bucket (absent when it is already gone). Nothing is deleted while an execution runs,
    unless --force, which cancels it.
    """
    if delete_bucket and not (yes or dry_run):
        try:
            typed = click.prompt(
                f"This deletes gs://{settings.bucket} and everything in it. Type the bucket name to confirm",
                default="",
                show_default=False,
                err=True,
            )
        except click.Abort:  # no input to read (a script, stdin closed) or Ctrl-C: click's bare "Aborted!"
            raise UserError(
                f"No bucket name was typed: nothing was deleted, gs://{settings.bucket} included.",
                "Type its name when asked, or pass --yes to delete it without asking (from a script).",
            ) from None
        if typed.strip() != settings.bucket:
            raise UserError(
                f"The name typed does not match bucket {settings.bucket}: nothing was deleted.",
                "Type the bucket name exactly, or pass --yes; leave out --delete-bucket to keep it.",
            )
    report: list[Change] = []

    def on_change(change: Change) -> None:
        report.append(change)
        if not as_json:
            print_change(change.kind, change.name, change.status, change.diff)

    teardown.down(
        Clients(settings.project_id),
        settings,
        delete_bucket_too=delete_bucket,
        force=force,
        dry_run=dry_run,
        on_change=on_change,
    )
    # Each API once, in the order of the steps that could not look.
    apis_off = list(dict.fromkeys(c.detail["api"] for c in report if c.status == teardown.NOT_CHECKED))
    if as_json:
        document = {
            "dry_run": dry_run,
            "changes": [change.document() for change in report],
            "apis_not_enabled": apis_off,
        }
        click.echo(json.dumps(document, indent=2))
        return
    if dry_run:
        commands = [change.command for change in report if change.command]
        console.print("\nDry run: nothing was deleted." + (" Equivalent commands:" if commands else ""))
        for command in commands:
            click.echo(f"  {command}")
    elif all(change.status in ("absent", "kept", teardown.NOT_CHECKED) for change in report):
        console.print("\nNothing left to delete" + (" that down could see." if apis_off else "."))
    elif any(change.kind == "bucket" and change.status == "kept" for change in report):
        # The one thing left, still billed for its storage: say what it holds and how it goes too.
        deleted = sum(change.status == "deleted" for change in report)
        console.print(
            f"\nDeleted {deleted} resources. gs://{settings.bucket} stays with the weights, data and "
            "results, which `status`, `results`, `report` and `logs` still read; `gemma-launch down "
            "--delete-bucket` deletes it too, `gemma-launch up` makes the rest again.",
            markup=False,
            soft_wrap=True,
        )
    if apis_off:
        err_console.print(
            f"[yellow]Note:[/] {', '.join(apis_off)} {'is' if len(apis_off) == 1 else 'are'} not enabled in "
            f"project {settings.project_id}, so down could not look for the resources marked not checked.",
            soft_wrap=True,
        )
        err_console.print(
            "[bold]Hint:[/] If `gemma-launch up` never ran in this project, there is nothing to delete. "
            f"Otherwise enable them (gcloud services enable {' '.join(apis_off)} "
            f"--project={settings.project_id}) and run `gemma-launch down` again.",
            soft_wrap=True,
        )
