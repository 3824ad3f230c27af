"""`gemma-launch results`: baseline vs fine-tuned metrics and where the outputs are; a sweep's
leaderboard; executions side by side."""

from __future__ import annotations

import dataclasses
import json

import click
from rich.table import Table

from launcher import cost, executions, kept_costs, leaderboard, past_runs, sweep
from launcher import report as run_report
from launcher import results as run_results
from launcher.cloud import Clients
from launcher.commands.options import JOB_SETTINGS, Command, settings_options
from launcher.commands.render import console
from launcher.settings import Settings

# What a run without a record shows of its duration and cost (launcher/kept_costs.py).
ESTIMATED = f"durations and costs {kept_costs.ESTIMATED}"


@click.command("results", cls=Command)
@settings_options(fields=JOB_SETTINGS)
@click.argument("names", metavar="[EXECUTION]...", nargs=-1)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print results.json, with an added outputs list: where each output is and whether it exists; "
    "for a sweep or several executions, their rows.",
)
def results(settings: Settings, names: tuple[str, ...], as_json: bool) -> None:
    """Baseline vs fine-tuned accuracy, macro-F1 and unknown rate of an execution (default: newest),
    and where its adapter, merged model, results.json and confusion matrix are.

    \b
    For a sweep: its leaderboard, a row per task, best final accuracy first.
    With several executions: side by side, the trainer settings in which they differ and the metrics
    (a sweep by its best task).

    After `down`, an execution whose record went with its job is read from the bucket, which keeps its
    results; its duration and cost are then estimated from the start (else the phases) they record."""
    clients = Clients(settings.project_id)
    # One named twice is shown once, as `report` does.
    looked_up = {
        one.name: one for one in (past_runs.find(clients, settings, name) for name in names or (None,))
    }
    compared = list(looked_up)
    if len(compared) > 1:
        rows = leaderboard.compare(clients, settings, compared)
        for one in looked_up.values():
            if one.execution is None and not as_json:
                source = f"results from {one.outputs_url(settings)}; {ESTIMATED}"
                console.print(one.note(source), markup=False, soft_wrap=True)
        _render_entries("Executions compared", rows, as_json)
        return
    (name,) = compared
    execution = looked_up[name].execution
    grid = sweep.grid_of(execution) if execution is not None else None
    if grid is not None:
        rows = leaderboard.leaderboard(clients, settings, execution, grid)
        _render_entries(f"Sweep {executions.short_name(name)}", rows, as_json)
        return
    found = run_results.load(clients, settings, name)
    kept_sweep = (
        leaderboard.kept_sweep(clients, settings, name) if execution is None and found is None else None
    )
    if kept_sweep is not None:
        if not as_json:
            source = f"its tasks' results from {looked_up[name].outputs_url(settings)}; {ESTIMATED}"
            console.print(looked_up[name].note(source), markup=False, soft_wrap=True)
        _render_entries(f"Sweep {executions.short_name(name)}", kept_sweep, as_json)
        return
    if found is None:
        raise run_results.no_results(clients, settings, name)
    places = run_results.outputs(clients, settings, name)
    # The cost comes from the execution's tasks; with the record gone, it is rebuilt from results.json.
    rebuilt = past_runs.numbers_of(clients, settings, name, found) if execution is None else None
    if rebuilt is None:
        (spent,) = cost.actual_costs(clients, settings, [execution])
    else:
        spent = rebuilt.usd
    if as_json:
        outputs = [dataclasses.asdict(out) for out in places]
        record = execution is not None
        click.echo(
            json.dumps({**found, "outputs": outputs, "cost_usd": spent, "execution_record": record}, indent=2)
        )
        return
    if execution is None:
        source = f"results from {looked_up[name].outputs_url(settings)}"
        console.print(looked_up[name].note(source), markup=False, soft_wrap=True)
    table = Table(title=f"Execution {executions.short_name(name)}")
    for column in ("metric", "baseline", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, before, after, change in run_results.rows(found):
        # A difference of two percentages is in percentage points: +62.2 pp, not +62.2 %.
        table.add_row(label, f"{before:.1%}", f"{after:.1%}", f"{change * 100:+.1f} pp")
    console.print(table)
    console.print(
        f"model {found.get('model_id')}; eval method {found.get('eval_method')}, {found.get('eval_size')} "
        f"test images, {found.get('train_size')} training images",
        soft_wrap=True,
    )
    if rebuilt is not None:
        cost_word = "cost " if rebuilt.usd is not None else ""
        console.print(cost_word + leaderboard.rebuilt_cost(rebuilt), soft_wrap=True)
    elif spent is not None:
        console.print(f"cost ≈ ${spent:.2f} (its tasks' run time at Cloud Run's prices)", soft_wrap=True)
    for out in places:
        if out.present:
            console.print(f"{out.label:<17} {out.url}  ({out.note})", markup=False, soft_wrap=True)
            console.print(f"{'':<17} {out.console}", markup=False, soft_wrap=True)
        else:
            console.print(f"{out.label:<17} {out.note}", markup=False, soft_wrap=True)
    if found.get("phases"):  # trainers that write report.html also record their phases
        console.print(
            f"{'report':<17} {run_report.link(settings, name, found)}", markup=False, soft_wrap=True
        )


def _render_entries(title: str, entries: list[leaderboard.Entry], as_json: bool) -> None:
    """A sweep's leaderboard or a comparison: a row per task or execution, its settings, then metrics."""
    if as_json:
        click.echo(json.dumps([entry.document() for entry in entries], indent=2))
        return
    keys = list(dict.fromkeys(key for entry in entries for key in entry.settings))
    table = Table(title=title)
    for column in ("", *keys, "state", "accuracy", "macro-F1", "duration", "cost"):
        table.add_column(column, justify="left" if column in ("", "state") else "right")

    def change(entry: leaderboard.Entry, metric: str) -> str:
        if metric not in entry.final:
            return "-"
        return f"{entry.baseline.get(metric, 0.0):.1%} -> {entry.final[metric]:.1%}"

    def unknown(entry: leaderboard.Entry) -> str:
        # Not yet while it runs; once ended, a number its record or results should have given.
        return "-" if entry.state in ("Pending", "Running") else "unknown"

    for entry in entries:
        table.add_row(
            entry.label,
            *[entry.settings.get(key, "") for key in keys],
            entry.state,
            change(entry, "accuracy"),
            change(entry, "macro_f1"),
            unknown(entry) if entry.duration_s is None else leaderboard.duration(entry.duration_s),
            unknown(entry) if entry.cost is None else f"${entry.cost:.2f}",
        )
    console.print(table)
