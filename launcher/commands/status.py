"""`gemma-launch status`: the job's executions, newest first."""

from __future__ import annotations

import json

import click
from rich.table import Table

from launcher import cost, executions, kept_costs, leaderboard, past_runs
from launcher import job as jobs
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
    """The job's executions, newest first: state, tasks, retries, start, duration, and why one failed;
    then the runs the bucket keeps whose record went with a deleted job (their state from their results,
    and their start, duration and cost estimated from the start, else the phases, results.json records, ≈).
    """
    clients = Clients(settings.project_id)
    job_exists = jobs.exists(clients, settings)
    found = executions.list_executions(clients, settings, limit) if job_exists else []
    summaries = [
        {**executions.summary(execution), "cost_usd": spent, "execution_record": True}
        for execution, spent in zip(found, cost.actual_costs(clients, settings, found), strict=True)
    ]
    # Fewer executions than the limit are all the job has: any other run in the bucket has no record.
    room = limit - len(found)
    recorded = [row["execution"] for row in summaries]
    kept = past_runs.without_record(clients, settings, recorded)[:room] if room else []
    rebuilt = past_runs.summaries(clients, settings, kept)
    summaries += [{**row, "execution_record": False} for row, _ in rebuilt]
    if not job_exists and not kept:
        raise past_runs.nothing_at_all(clients, settings)
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    if not job_exists:
        console.print(f"Job {settings.job} does not exist in {settings.region} (`down` deleted it?).")
    elif not found:
        console.print(f"Job {settings.job} has no executions yet. Start one with `gemma-launch run`.")
    if not summaries:
        return
    table = Table(title=f"{settings.job} ({settings.region})")
    for column in ("execution", "state", "succeeded", "failed", "retried", "started", "duration", "cost"):
        table.add_column(column)
    for row in summaries:
        # A run without a record: its numbers are estimates (≈), and what it wrote may not tell them.
        recorded, none = row["execution_record"], "-" if row["execution_record"] else "unknown"
        about = "" if recorded else "≈ "
        table.add_row(
            row["execution"],
            row["state"],
            f"{row['succeeded']}/{row['tasks']}" if recorded else "-",
            str(row["failed"]) if recorded else "-",
            str(row["retried"]) if recorded else "-",
            about + row["started"].replace("T", " ").removesuffix("Z") if row["started"] else none,
            none if row["duration_s"] is None else about + leaderboard.duration(row["duration_s"]),
            none if row["cost_usd"] is None else f"{about}${row['cost_usd']:.2f}",
        )
    console.print(table)
    if kept:
        gone = executions.why_no_record(clients, settings)
        console.print(
            f"{', '.join(run.name for run in kept)}: execution record gone ({gone}); "
            f"state from their results in gs://{settings.bucket}/{jobs.RUNS_PREFIX}/, "
            f"starts, durations and costs (≈) {kept_costs.ESTIMATED}",
            markup=False,
            soft_wrap=True,
        )
        for row, missing in rebuilt:
            if missing:
                console.print(f"{row['execution']}: {missing}", markup=False, soft_wrap=True)
    for row in summaries:
        if row["why"]:
            console.print(f"{row['execution']} {row['state'].lower()}: {row['why']}", soft_wrap=True)
