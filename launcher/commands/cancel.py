"""`gemma-launch cancel`: stop an execution; safe to run again."""

from __future__ import annotations

import json

import click

from launcher import executions, past_runs
from launcher import job as jobs
from launcher.cloud import Clients
from launcher.commands.options import JOB_SETTINGS, Command, settings_options
from launcher.commands.render import console
from launcher.settings import Settings


@click.command("cancel", cls=Command)
@settings_options(fields=JOB_SETTINGS)
@click.argument("execution", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def cancel(settings: Settings, execution: str | None, as_json: bool) -> None:
    """Stop an execution (default: the newest running one); safe to run again.

    Its tasks are stopped and it ends as Cancelled; what it wrote to the bucket stays. Cancelling one
    that already finished changes nothing and says how it ended.
    """
    clients = Clients(settings.project_id)
    if execution:
        found = past_runs.find(clients, settings, execution)
        if found.execution is None:  # a record goes only with its job, which runs nothing then
            _say_ended(found, as_json)
            return
        name = found.name
    else:
        unfinished = executions.running(clients, settings) if jobs.exists(clients, settings) else []
        if not unfinished:
            if as_json:
                click.echo(json.dumps({"execution": None, "status": "unchanged", "state": None}, indent=2))
            else:
                console.print(f"No execution of job {settings.job} is running: nothing to cancel.")
            return
        name = unfinished[0].name
    outcome = executions.cancel(clients, settings, name)
    short, verdict = executions.short_name(name), executions.state(outcome.execution)
    if as_json:
        click.echo(json.dumps({"execution": short, "status": outcome.status, "state": verdict}, indent=2))
    elif outcome.status == "cancelled":
        console.print(f"Cancelled execution {short}.")
    elif outcome.status == "cancelling":
        console.print(
            f"Asked execution {short} to stop; it is still stopping. `gemma-launch status` shows when it has."
        )
    else:
        console.print(f"Execution {short} had already finished ({verdict.lower()}): nothing to cancel.")


def _say_ended(found: past_runs.Found, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"execution": found.short, "status": "unchanged", "state": None}, indent=2))
    else:
        console.print(found.note("it has ended: nothing to cancel."), markup=False, soft_wrap=True)
