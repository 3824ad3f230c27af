"""`gemma-launch logs`: an execution's log, whole or followed, as text or JSON lines."""

from __future__ import annotations

import json

import click

from launcher import executions, logs, past_runs
from launcher.cloud import Clients
from launcher.commands.follow import fail_unless_succeeded, follow_on_screen, task_succeeded
from launcher.commands.options import FOLLOW_VERBOSE, JOB_SETTINGS, Command, settings_options
from launcher.commands.render import err_console
from launcher.errors import UserError
from launcher.settings import Settings


def _emit(line: logs.Line) -> None:
    click.echo(line.render())


def _emit_json(line: logs.Line) -> None:
    click.echo(json.dumps(line.document()))


@click.command("logs", cls=Command)
@settings_options(fields=JOB_SETTINGS)
@click.argument("execution", required=False)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep streaming until the execution ends (with --task: that task); exit 1 if it failed.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per line: {"timestamp": RFC 3339 or null, "task": index or null, "text": ...}; '
    "with --follow, every line and nothing else on stdout.",
)
@FOLLOW_VERBOSE
@click.option(
    "--task",
    type=click.IntRange(min=0),
    help="Only this task's lines (a sweep's task index, as `results` lists them).",
)
def logs_command(
    settings: Settings, execution: str | None, follow: bool, as_json: bool, verbose: bool, task: int | None
) -> None:
    """Show an execution's logs (default: the newest), with the task index on each line.

    With --follow, the trainer's step lines show as a progress bar with the time left (on a terminal)
    or a line at each quarter of the steps; --verbose shows them all. With --task too, following ends
    when that task has, and the exit status is that task's.

    After `down`, an execution whose record went with its job is still found in Cloud Logging, which
    keeps its lines (30 days by default)."""
    clients = Clients(settings.project_id)
    found = past_runs.find(clients, settings, execution, logs_too=True)
    name = found.name
    if found.execution is None:
        _show_kept_log(clients, settings, found, as_json, follow, task)
        return
    if task is not None:
        found = executions.get_execution(clients, settings, name)
        if task >= found.task_count:
            raise UserError(
                f"Execution {executions.short_name(name)} has {found.task_count} task(s): there is no task "
                f"{task}.",
                ("Give --task 0" if found.task_count == 1 else f"Give --task 0 to {found.task_count - 1}")
                + ", or leave it out for every task.",
            )
    if as_json and follow:
        final = executions.follow(clients, settings, name, _emit_json, task=task)
        if not (executions.succeeded(final) if task is None else task_succeeded(clients, final, task)):
            raise SystemExit(1)
    elif follow:
        final = follow_on_screen(clients, settings, name, verbose=verbose, task=task)
        fail_unless_succeeded(clients, settings, final, task)
    elif not executions.show_log(clients, settings, name, _emit_json if as_json else _emit, task):
        _say_no_lines(clients, settings, name, task)


def _say_no_lines(clients: Clients, settings: Settings, name: str, task: int | None) -> None:
    """On stderr, so that stdout stays the log (or its JSON lines): an empty log is not a silent one."""
    found = executions.get_execution(clients, settings, name)
    what = f"execution {executions.short_name(name)}"
    state = executions.state(found)
    if task is not None:
        what = f"task {task} of {what}"
        state = executions.task_state(executions.find_task(executions.tasks_of(clients, name), task))
    yet = "" if executions.is_done(found) or state in ("Succeeded", "Failed") else " yet"
    err_console.print(f"No log lines{yet} from {what} ({state.lower()}).", soft_wrap=True, markup=False)


def _show_kept_log(
    clients: Clients,
    settings: Settings,
    found: past_runs.Found,
    as_json: bool,
    follow: bool,
    task: int | None,
) -> None:
    """The log of an execution whose record is gone: it has ended, so --follow shows what there is and
    exits with what the bucket says of it (1 unless its results say it succeeded)."""
    emit = _emit_json if as_json else _emit
    shown = 0

    def noted(line: logs.Line) -> None:
        # The note comes before the first line: a run found nowhere gets the error alone.
        nonlocal shown
        if not shown:
            err_console.print(found.note("its log from Cloud Logging"), soft_wrap=True, markup=False)
        shown += 1
        emit(line)

    if not past_runs.show_log(clients, settings, found, noted, task):
        what = found.short if task is None else f"task {task} of {found.short}"
        err_console.print(
            found.note(f"no log lines from {what} in Cloud Logging, which keeps them 30 days by default."),
            soft_wrap=True,
            markup=False,
        )
    if follow and not past_runs.succeeded(clients, settings, found.name):
        raise SystemExit(1)
