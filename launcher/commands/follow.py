"""Following an execution on screen, as `run --follow` and `logs --follow` show it."""

from __future__ import annotations

import click
from google.cloud import run_v2

from launcher import executions, progress
from launcher import results as run_results
from launcher.cloud import Clients
from launcher.commands.render import console, err_console
from launcher.errors import UserError
from launcher.settings import Settings


def follow_on_screen(
    clients: Clients, settings: Settings, execution: str, *, verbose: bool = False, quiet: bool = False
) -> run_v2.Execution:
    """Stream the log until the execution ends and say how it ended; returns it as it ended.

    `quiet`: everything to stderr (stdout is kept for JSON)."""
    out = err_console if quiet else console
    view = progress.TrainingView(out, lambda line: click.echo(line.render(), err=quiet), verbose=verbose)
    try:
        final = executions.follow(clients, settings, execution, view)
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
