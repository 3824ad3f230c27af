"""`gemma-launch status`: the job's executions, newest first."""

from __future__ import annotations

import json

import click
from rich.table import Table

from launcher import cost, executions, leaderboard
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
    clients = Clients(settings.project_id)
    found = executions.list_executions(clients, settings, limit)
    summaries = [
        {**executions.summary(execution), "cost_usd": spent}
        for execution, spent in zip(found, cost.actual_costs(clients, settings, found), strict=True)
    ]
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    if not summaries:
        console.print(f"Job {settings.job} has no executions yet. Start one with `gemma-launch run`.")
        return
    table = Table(title=f"{settings.job} ({settings.region})")
    for column in ("execution", "state", "succeeded", "failed", "retried", "started", "duration", "cost"):
        table.add_column(column)
    for row in summaries:
        table.add_row(
            row["execution"],
            row["state"],
            f"{row['succeeded']}/{row['tasks']}",
            str(row["failed"]),
            str(row["retried"]),
            row["started"].replace("T", " ").removesuffix("Z") if row["started"] else "-",
            leaderboard.duration(row["duration_s"]),
            "-" if row["cost_usd"] is None else f"${row['cost_usd']:.2f}",
        )
    console.print(table)
    for row in summaries:
        if row["why"]:
            console.print(f"{row['execution']} {row['state'].lower()}: {row['why']}", soft_wrap=True)
