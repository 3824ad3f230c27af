"""`gemma-launch sweep`: one execution of the job, a task per combination of a grid of trainer settings."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

import click
from rich.markup import escape
from rich.table import Table

from launcher import cost, executions, overrides, start_checks, sweep
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
from launcher.settings import Settings


@click.command("sweep", cls=Command)
@settings_options(fields=(*JOB_SETTINGS, "gpu", "gpu_zonal_redundancy"))
@click.option(
    "--grid",
    "grids",
    multiple=True,
    required=True,
    metavar="KEY=VALUE,VALUE,...",
    help="A trainer setting and the values to try (repeatable); one task per combination, each value "
    "checked as --set checks it.",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="A trainer setting for every task of the sweep (repeatable), as `run --set` takes it.",
)
@TRAIN_SIZE
@click.option(
    "--parallelism",
    type=click.IntRange(min=1),
    help="Tasks running at once (default: as many as the GPU quota allows, each holding one GPU).",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Stream the logs until the sweep ends; exit 0 only if every task succeeded.",
)
@click.option("--allow-concurrent", is_flag=True, help="Start even while another execution of the job runs.")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check everything a sweep checks, then show each task's combination and trainer arguments, the "
    "parallelism and the estimated cost (exit 2 above --max-cost); start nothing, change nothing.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the execution as JSON (as `run --json` does); with --dry-run, the plan.",
)
@FOLLOW_VERBOSE
@max_cost_option(" of all the tasks")
def sweep_command(
    settings: Settings,
    grids: tuple[str, ...],
    sets: tuple[str, ...],
    train_size: int | None,
    parallelism: int | None,
    follow: bool,
    allow_concurrent: bool,
    dry_run: bool,
    as_json: bool,
    verbose: bool,
    max_cost: float | None,
) -> None:
    """Try every combination of trainer settings as one execution of the job, a task per combination.

    \b
    e.g. gemma-launch sweep --grid learning-rate=1e-4,2e-4,5e-4 --grid lora-r=8,16   (6 tasks)
    Task i trains combination i and writes under runs/<execution>/task-<i>/, where its retries resume
    from its own checkpoints. `gemma-launch results` then ranks the tasks; `logs --task I` shows one.
    Nothing starts when a value is not valid for the trainer, a combination does not fit the GPU or
    the staged data, or the GPU quota cannot hold --parallelism tasks at once. --dry-run stops there,
    after the same checks: its errors are the sweep's, and nothing starts or changes.
    """
    if dry_run and follow:
        raise UserError(
            "--follow and --dry-run together: a dry run starts nothing to follow.",
            "Drop --follow to see the plan, or --dry-run to start the sweep and follow it.",
        )
    changes = with_train_size(overrides.parse_sets(sets), train_size)
    grid = sweep.parse_grid(grids, changes)
    clients = Clients(settings.project_id)
    # The same checks, in the same order, for a dry run as for the sweep: a dry run that passes them
    # means the sweep gets past them too.
    ready = start_checks.check(clients, settings, changes, grid, allow_concurrent=allow_concurrent)
    args, notes = ready.args, ready.notes
    for note in notes:
        say_fit(note)
    tasks = len(grid.combinations())
    chosen = sweep.choose_parallelism(clients, settings, tasks, parallelism)
    out = err_console if as_json else console
    counted = "1 task" if tasks == 1 else f"{tasks} tasks"
    out.print(f"{counted}, {chosen.tasks} at a time ({chosen.why}).", soft_wrap=True, markup=False)
    estimate = cost.for_sweep(clients, settings, ready.job, args, grid.combinations())
    out.print(f"Estimated cost: {estimate.describe()}", soft_wrap=True)
    if dry_run:
        _show_plan(grid, args, chosen, estimate, notes, max_cost, as_json)
        cost.check_max_cost(estimate, max_cost)
        if not as_json:
            console.print("\nDry run: nothing was started or changed.")
        return
    cost.check_max_cost(estimate, max_cost)
    execution = sweep.start(clients, settings, grid, args, chosen.tasks)
    short = executions.short_name(execution.name)
    out.print(f"Started execution {short}")
    if not follow_or_show(
        clients, settings, execution, estimate, follow=follow, as_json=as_json, verbose=verbose
    ):
        console.print(
            f"Follow it with: gemma-launch logs {short} --follow; rank its tasks with: "
            f"gemma-launch results {short}",
            soft_wrap=True,
        )


def _show_plan(
    grid: sweep.Grid,
    args: Sequence[str],
    chosen: sweep.Parallelism,
    estimate: cost.Estimate,
    notes: Sequence[str],
    max_cost: float | None,
    as_json: bool,
) -> None:
    """What the sweep would run: each task's combination and the trainer arguments it parses."""
    combinations = grid.combinations()
    task_args = grid.task_args(args)
    within = None if max_cost is None else estimate.usd <= max_cost
    if as_json:
        document = {
            "dry_run": True,
            "execution_args": list(args),
            "tasks": [
                {"task": index, "settings": combination, "args": argv}
                for index, (combination, argv) in enumerate(zip(combinations, task_args, strict=True))
            ],
            "parallelism": {"tasks": chosen.tasks, "why": chosen.why},
            "estimate": estimate.document(),
            "max_cost": None if max_cost is None else {"cost_usd": max_cost, "within": within},
            "notes": list(notes),
        }
        click.echo(json.dumps(document, indent=2))
        return
    console.print(f"Trainer arguments of every task: {shlex.join(args)}", soft_wrap=True, markup=False)
    # A line, not the table's title: a title wraps to the width of a narrow table.
    console.print("Then each task's own, parsed after them (its values win):")
    table = Table()
    for column in ("", *grid.values, "its arguments"):
        table.add_column(escape(column))
    for index, (combination, argv) in enumerate(zip(combinations, task_args, strict=True)):
        cells = [*combination.values(), shlex.join(argv[len(args) :])]
        table.add_row(f"task {index}", *map(escape, cells))
    console.print(table)
    if within:
        console.print(f"Within --max-cost ${max_cost:.2f}.")
