"""Following an execution on screen, as `run --follow` and `logs --follow` show it."""

from __future__ import annotations

import json
from typing import Any

import click
from google.cloud import run_v2

from launcher import cost, executions, progress
from launcher import results as run_results
from launcher.cloud import GRANT_PROPAGATION_S, Clients
from launcher.commands.render import console, err_console
from launcher.errors import UserError
from launcher.iam_bindings import OBJECT_USER
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
    """Stream the log until the execution ends and say how it ended; returns it as it ended. With `task`:
    that task's log until that task ends, then how it ended and whether the execution goes on.

    `quiet`: everything to stderr (stdout is kept for JSON)."""
    out = err_console if quiet else console
    view = progress.TrainingView(out, lambda line: click.echo(line.render(), err=quiet), verbose=verbose)
    short = executions.short_name(execution)
    resume = f"gemma-launch logs {short}" + (f" --task {task}" if task is not None else "") + " --follow"
    try:
        final = executions.follow(clients, settings, execution, view, task=task)
    except KeyboardInterrupt:
        view.stop()
        err_console.print(
            f"\nStopped following; the execution goes on. Resume with: {resume}; stop it with: "
            f"gemma-launch cancel {short}"
        )
        raise SystemExit(130) from None
    view.stop()
    if task is None:
        ending = _execution_ending(final)
    else:
        ending = _task_ending(executions.tasks_of(clients, final.name), final, task)
    out.print(ending, markup=False, soft_wrap=True)
    return final


def _execution_ending(final: run_v2.Execution) -> str:
    return (
        f"Execution {executions.short_name(final.name)} {executions.state(final).lower()}: "
        f"{final.succeeded_count}/{final.task_count} tasks succeeded, {final.retried_count} retried."
        + (f" {executions.why(final)}" if executions.why(final) else "")
    )


def _task_ending(tasks: list[run_v2.Task], final: run_v2.Execution, task: int) -> str:
    """How task `task` ended, and whether the execution goes on without it."""
    short = executions.short_name(final.name)
    found = executions.find_task(tasks, task)
    state = executions.task_state(found)
    if state in ("Pending", "Running"):  # the execution ended before this task could
        ended_as = executions.state(final).lower()
        return f"Task {task} of execution {short} did not run to its end: the execution {ended_as} first."
    retried = found.retried if found is not None else 0
    ending = f"Task {task} of execution {short} {state.lower()}" + (
        f" after {retried} {'retry' if retried == 1 else 'retries'}" if retried else ""
    )
    why = executions.task_why(found)
    ending += f": {why}" if why else "."
    if executions.is_done(final):
        return ending
    # Counted from the tasks, read after this one ended, rather than the execution's counters, which
    # Cloud Run updates apart from them.
    ended = sum(1 for other in tasks if other.completion_time)
    return (
        f"{ending}\nExecution {short} goes on ({ended}/{final.task_count} tasks ended). Follow it with: "
        f"gemma-launch logs {short} --follow"
    )


def task_succeeded(clients: Clients, final: run_v2.Execution, task: int) -> bool:
    found = executions.find_task(executions.tasks_of(clients, final.name), task)
    return executions.task_state(found) == "Succeeded"


def fail_unless_succeeded(
    clients: Clients, settings: Settings, final: run_v2.Execution, task: int | None = None
) -> None:
    """Exit 2 with the trainer's Error/Hint when it recorded an error a retry cannot fix, else 1; with
    `task`, unless that task succeeded, whatever the execution does."""
    short = executions.short_name(final.name)
    if task is None:
        succeeded, what = executions.state(final) == "Succeeded", f"Execution {short}"
    else:
        succeeded, what = task_succeeded(clients, final, task), f"Task {task} of execution {short}"
    if succeeded:
        return
    stopped = run_results.recorded_failure(clients, settings, final.name, task)
    if stopped is not None:
        raise UserError(f"{what} stopped on an error a retry cannot fix: {stopped.message}", stopped.hint)
    if executions.refused_a_new_role(clients, settings, final):
        raise UserError(
            f"{what} could not start: the job's account {settings.service_account_email} was refused the "
            f"bucket gs://{settings.bucket}, though it holds {OBJECT_USER} there.",
            f"`gemma-launch up` granted that role moments ago, and Google takes up to "
            f"{GRANT_PROPAGATION_S / 60:g} minutes to put a new role in effect: run the same command again "
            "in a few minutes.",
        )
    raise SystemExit(1)


def execution_document(
    clients: Clients, settings: Settings, execution: run_v2.Execution, estimate: cost.Estimate
) -> dict[str, Any]:
    """An execution for --json: its row of `status --json` (cost_usd null until it ends), its full name,
    the job's, and the estimate made before it started."""
    (spent,) = cost.actual_costs(clients, settings, [execution])
    return {
        **executions.summary(execution),
        "cost_usd": spent,
        "execution_record": True,
        "name": execution.name,
        "job": execution.job,
        "estimate": estimate.document(),
    }


def follow_or_show(
    clients: Clients,
    settings: Settings,
    execution: run_v2.Execution,
    estimate: cost.Estimate,
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
            click.echo(json.dumps(execution_document(clients, settings, final, estimate), indent=2))
        fail_unless_succeeded(clients, settings, final)
        return True
    if as_json:
        click.echo(json.dumps(execution_document(clients, settings, execution, estimate), indent=2))
        return True
    return False
