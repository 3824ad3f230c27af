"""`gemma-launch run`: refuse what cannot run, start one execution, optionally follow it."""

from __future__ import annotations

import click

from launcher import cost, executions, overrides, quota, start_checks
from launcher.cloud import Clients
from launcher.commands.follow import follow_or_show
from launcher.commands.options import (
    FOLLOW_VERBOSE,
    JOB_SETTINGS,
    TRAIN_SIZE,
    Command,
    max_cost_option,
    settings_options,
    with_train_size,
)
from launcher.commands.render import console, err_console, say_fit
from launcher.errors import UserError
from launcher.settings import Settings, check_run_timeout
from launcher.settings_rules import parse_duration


@click.command("run", cls=Command)
@settings_options(fields=(*JOB_SETTINGS, "gpu", "gpu_zonal_redundancy", "task_timeout"))
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a trainer flag for this run (repeatable), checked against the trainer's own flags. "
    f"Keys: {', '.join(overrides.settable())}.",
)
@TRAIN_SIZE
@click.option(
    "--timeout",
    help="Task timeout for this execution, e.g. 2h or 45m. With a GPU at most 12h, and over 1h only when "
    "the job's own task_timeout is over 1h (Cloud Run's Preview of long running GPU jobs).",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Stream the logs until the execution ends; exit 0 only if it succeeded.",
)
@click.option(
    "--allow-concurrent",
    is_flag=True,
    help="Start even while another execution of the job runs (each holds its own GPU).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the execution as JSON (as `status --json` shows one); with --follow once it has ended, "
    "the log going to stderr.",
)
@FOLLOW_VERBOSE
@max_cost_option("")
def run_command(
    settings: Settings,
    sets: tuple[str, ...],
    train_size: int | None,
    timeout: str | None,
    follow: bool,
    allow_concurrent: bool,
    as_json: bool,
    verbose: bool,
    max_cost: float | None,
) -> None:
    """Execute the job once, optionally overriding trainer flags, and print the execution's name.

    Nothing starts when the job's GPU cannot run the image or its model (with the --set given) does not
    fit the GPU's memory, while another execution of the job is running (stop it with `gemma-launch
    cancel`, or pass --allow-concurrent), nor when the project's Cloud Run GPU quota in the job's region
    cannot give the execution its GPU: the error names the quota to request and where.

    With --follow, the log streams until the execution ends; the trainer's step lines show as a
    progress bar with the time left (on a terminal) or a line at each quarter of the steps.

    An execution is one training on one GPU. For replicates or several settings at once, run a sweep:
    `gemma-launch sweep --grid seed=1,2,3`.
    """
    changes = with_train_size(overrides.parse_sets(sets), train_size)
    timeout_s = None
    if timeout:
        try:
            timeout_s = parse_duration(timeout)
        except ValueError as error:
            raise UserError(f"Invalid --timeout: {error}.", "Use a duration like 2h, 45m or 3600s.") from None
        check_run_timeout(settings, timeout_s)
    clients = Clients(settings.project_id)
    ready = start_checks.check(clients, settings, changes, allow_concurrent=allow_concurrent)
    for note in ready.notes:
        say_fit(note)
    args = ready.args
    try:
        quota.require_for_run(clients, settings, executions.gpus_held(clients, settings))
    except quota.QuotaUnknown as unknown:
        err_console.print(f"[yellow]Warning:[/] {unknown}; starting anyway.", soft_wrap=True)
    estimate = cost.for_job(clients, settings, ready.job, args)
    (err_console if as_json else console).print(f"Estimated cost: {estimate.describe()}", soft_wrap=True)
    cost.check_max_cost(estimate, max_cost)
    # One task, always sent, never the job's own count: a sweep whose restore of the job was cut off (the
    # process killed between its two UpdateJobs) leaves the job at the sweep's task count until `up`
    # repairs it. More tasks would only train the same settings again into the same runs/<execution>/.
    execution = executions.run(
        clients, settings, args=args if changes else None, tasks=1, timeout_s=timeout_s
    )
    short = executions.short_name(execution.name)
    if follow:
        (err_console if as_json else console).print(f"Started execution {short}")
    if not follow_or_show(
        clients, settings, execution, estimate, follow=follow, as_json=as_json, verbose=verbose
    ):
        console.print(f"Started execution {short}")
        console.print(f"Follow it with: gemma-launch logs {short} --follow")
