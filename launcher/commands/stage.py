"""`gemma-launch stage`: the model weights and the dataset into the bucket."""

from __future__ import annotations

import json

import click

from launcher import job as jobs
from launcher import staging
from launcher.changes import Change
from launcher.cloud import Clients
from launcher.commands.options import STAGE_SETTINGS, Command, settings_options, source_options
from launcher.commands.render import console, err_console, print_change
from launcher.settings import Settings
from launcher.staging.transfer import human_bytes
from launcher.staging.view import StagingView


@click.command("stage", cls=Command)
@settings_options(fields=STAGE_SETTINGS)
@source_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the plan (what would be transferred, where) and the equivalent commands; change nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="A line per file staged.")
def stage(
    settings: Settings,
    model_source: str | None,
    dataset_source: str | None,
    revision: str | None,
    stage_in: str,
    dry_run: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Copy the model weights and the dataset into the bucket (`up` does this too); safe to run again.

    Hub files stream straight into the bucket (no local copy), several at once, each verified against
    the Hub's sha256 and the bucket's crc32c; what is already there intact is skipped, and an
    interrupted run picks up where it stopped. With the project's image built (by `up`), Hub repos are
    staged by a short CPU job in the region, <job>-stage, whose progress is shown here.
    """

    staging.check_named_sources(model_source, dataset_source)
    clients = Clients(settings.project_id)
    out = err_console if as_json else console
    jobs_changed: list[Change] = []

    def on_job(change: Change) -> None:
        jobs_changed.append(change)
        if not as_json and not dry_run:  # a dry run's plan is shown whole, at the end
            print_change("staging job", change.name, change.status, change.diff)

    sources = staging.choose_sources(clients.storage, settings, model_source, dataset_source, revision)
    if sources.recorded:
        out.print(sources.describe(settings.bucket), style="dim", soft_wrap=True)
    sources.check_here(settings.bucket)
    image = None
    if stage_in != "local":
        image = jobs.current_image(clients, settings) or jobs.latest_image(clients, settings)
    staged = staging.stage(
        clients,
        settings,
        model_source=sources.model,
        dataset_source=sources.dataset,
        revision=sources.revision,
        stage_in=stage_in,
        image=image,
        dry_run=dry_run,
        on_event=StagingView(out, verbose=verbose),
        on_job=on_job,
        verbose=verbose,
    )
    commands = [change.command for change in jobs_changed if change.status != "unchanged"]
    for item in staged:
        if item.command and item.command not in commands:
            commands.append(item.command)
    if as_json:
        document = {"dry_run": dry_run, "staged": [staging.document(item) for item in staged]}
        click.echo(json.dumps({**document, "commands": commands} if dry_run else document, indent=2))
        return
    if dry_run:
        console.print("Plan (dry run: nothing is transferred, created or changed):")
        for change in jobs_changed:
            print_change("staging job", change.name, change.status, change.diff)
    for item in staged:
        where = "by the staging job" if item.detail["staged_in"] == "cloud" else "from this machine"
        print_change(
            item.kind,
            f"{item.name} ({item.detail['files']} files, {human_bytes(item.detail['bytes'])}, {where})",
            item.status,
            item.diff,
        )
    if dry_run:
        if commands:
            console.print("Equivalent commands:")
            for command in commands:
                click.echo(f"  {command}")
        console.print("\nDry run: nothing was changed.")
