"""`gemma-launch status`: the job's executions, newest first."""

from __future__ import annotations

import json

import click
from rich.table import Table

from launcher import executions
from launcher.cloud import Clients
from launcher.commands.options import JOB_SETTINGS, Command, settings_options
from launcher.commands.render import console
from launcher.settings import Settings


@click.command("status", cls=Command)
@settings_options(fields=JOB_SETTINGS)
@click.option(
    "--limit", type=click.IntRange(min=1), default=10, show_default=True, help="How many executions."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(settings: Settings, limit: int, as_json: bool) -> None:
    """The job's executions, newest first: state, tasks, retries, start, duration, and why one failed."""
    summaries = [
        executions.summary(found)
        for found in executions.list_executions(Clients(settings.project_id), settings, limit)
    ]
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    if not summaries:
        console.print(f"Job {settings.job} has no executions yet. Start one with `gemma-launch run`.")
        return
    table = Table(title=f"{settings.job} ({settings.region})")
    for column in ("execution", "state", "succeeded", "failed", "retried", "started", "duration"):
        table.add_column(column)
    for row in summaries:
        table.add_row(
            row["execution"],
            row["state"],
            f"{row['succeeded']}/{row['tasks']}",
            str(row["failed"]),
            str(row["retried"]),
            row["started"] or "-",
            row["duration"] or "-",
        )
    console.print(table)
    for row in summaries:
        if row["why"]:
            console.print(f"{row['execution']} {row['state'].lower()}: {row['why']}", soft_wrap=True)
