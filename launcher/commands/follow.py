"""Following an execution on screen, as `run --follow` and `logs --follow` show it."""

from __future__ import annotations

import json
from typing import Any

import click
from google.cloud import run_v2

from launcher import executions, progress
from launcher import results as run_results
from launcher.cloud import Clients
from launcher.commands.render import console, err_console
from launcher.errors import UserError
from launcher.settings import Settings


def follow_on_screen(
    clients: Clients,
    settings: Settings,
    execution: str,
    *,
    verbose: bool = False,
    quiet: bool = False,
    task: int | None = None,
) -> run_v2.Execution:
    """Stream the log (`task`: that task's) until the execution ends and say how it ended; returns it as
    it ended.

    `quiet`: everything to stderr (stdout is kept for JSON)."""
    out = err_console if quiet else console
    view = progress.TrainingView(out, lambda line: click.echo(line.render(), err=quiet), verbose=verbose)
    try:
        final = executions.follow(clients, settings, execution, view, task=task)
    except KeyboardInterrupt:
        view.stop()
        err_console.print(
            "\nStopped following; the execution goes on. Resume with: "
            f"gemma-launch logs {executions.short_name(execution)} --follow; stop it with: "
            f"gemma-launch cancel {executions.short_name(execution)}"
        )
        raise SystemExit(130) from None
    view.stop()
    out.print(
        f"Execution {executions.short_name(execution)} {executions.state(final).lower()}: "
        f"{final.succeeded_count}/{final.task_count} tasks succeeded, {final.retried_count} retried."
        + (f" {executions.why(final)}" if executions.why(final) else ""),
        markup=False,
        soft_wrap=True,
    )
    return final


def fail_unless_succeeded(clients: Clients, settings: Settings, final: run_v2.Execution) -> None:
    """Exit 2 with the trainer's Error/Hint when it recorded an error a retry cannot fix, else 1."""
    if executions.state(final) == "Succeeded":
        return
    stopped = run_results.recorded_failure(clients, settings, final.name)
    if stopped is not None:
        raise UserError(
            f"Execution {executions.short_name(final.name)} stopped on an error a retry cannot fix: "
            f"{stopped.message}",
            stopped.hint,
        )
    raise SystemExit(1)


def execution_document(execution: run_v2.Execution) -> dict[str, Any]:
    """An execution for --json: its row of `status --json`, its full name and the job's."""
    return {**executions.summary(execution), "name": execution.name, "job": execution.job}


def follow_or_show(
    clients: Clients,
    settings: Settings,
    execution: run_v2.Execution,
    *,
    follow: bool,
    as_json: bool,
    verbose: bool,
) -> bool:
    """What `run` and `sweep` do once the execution started: with --follow, stream it until it ends (then
    its JSON with --json) and exit unless it succeeded; else its JSON with --json. False when nothing was
    shown: the caller then says how to follow it."""
    if follow:
        final = follow_on_screen(clients, settings, execution.name, verbose=verbose, quiet=as_json)
        if as_json:
            click.echo(json.dumps(execution_document(final), indent=2))
        fail_unless_succeeded(clients, settings, final)
        return True
    if as_json:
        click.echo(json.dumps(execution_document(execution), indent=2))
        return True
    return False
