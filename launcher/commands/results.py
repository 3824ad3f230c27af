"""`gemma-launch results`: baseline vs fine-tuned metrics and where the outputs are."""

from __future__ import annotations

import dataclasses
import json

import click
from rich.table import Table

from launcher import executions
from launcher import report as run_report
from launcher import results as run_results
from launcher.cloud import Clients
from launcher.commands.options import JOB_SETTINGS, Command, settings_options
from launcher.commands.render import console
from launcher.settings import Settings


@click.command("results", cls=Command)
@settings_options(fields=(*JOB_SETTINGS, "bucket"))
@click.argument("execution", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print results.json, with an added outputs list: where each output is and whether it exists.",
)
def results(settings: Settings, execution: str | None, as_json: bool) -> None:
    """Baseline vs fine-tuned accuracy, macro-F1 and unknown rate of an execution (default: newest),
    and where its adapter, merged model, results.json and confusion matrix are."""
    clients = Clients(settings.project_id)
    name = executions.execution_name(clients, settings, execution)
    found = run_results.load(clients, settings, name)
    if found is None:
        raise run_results.no_results(clients, settings, name)
    places = run_results.outputs(clients, settings, name)
    if as_json:
        click.echo(json.dumps({**found, "outputs": [dataclasses.asdict(out) for out in places]}, indent=2))
        return
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
