"""`gemma-launch report`: one self-contained HTML page of one or more executions."""

from __future__ import annotations

import webbrowser
from pathlib import Path

import click

from launcher import past_runs
from launcher import report as run_report
from launcher.cloud import Clients
from launcher.commands.options import JOB_SETTINGS, Command, settings_options
from launcher.commands.render import console, err_console
from launcher.settings import Settings
from launcher.staging.transfer import human_bytes


@click.command("report", cls=Command)
@settings_options(fields=JOB_SETTINGS)
@click.argument("names", metavar="[EXECUTION]...", nargs=-1)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("."),
    show_default="the current directory",
    help="Directory to write the HTML file into.",
)
@click.option(
    "--open",
    "open_page",
    is_flag=True,
    help="Open the page in the default web browser (or say that none opened it, as over SSH).",
)
def report(settings: Settings, names: tuple[str, ...], out_dir: Path, open_page: bool) -> None:
    """Write one self-contained HTML report of executions (default: the newest): the run and its settings,
    baseline vs fine-tuned, per-breed table, confusion heat map, training curve, gallery of mistakes;
    with several, or a sweep's tasks that wrote results, a leaderboard and a side-by-side comparison too.
    It works offline. After `down`, an execution whose record went with its job is read from the bucket,
    which keeps its outputs; its cost is then estimated from its results (≈), as `results` shows it."""
    clients = Clients(settings.project_id)
    looked_up = {
        one.name: one for one in (past_runs.find(clients, settings, name) for name in names or (None,))
    }
    for one in looked_up.values():
        if one.execution is None:
            source = f"its page from {one.outputs_url(settings)}"
            console.print(one.note(source), markup=False, soft_wrap=True)
    gone = {name for name, one in looked_up.items() if one.execution is None}
    path = run_report.write(clients, settings, list(looked_up), out_dir, gone)
    console.print(f"Wrote {path} ({human_bytes(path.stat().st_size)}).", markup=False, soft_wrap=True)
    # On a machine without a browser (a VM reached over SSH, say) nothing opens: say so, rather than nothing.
    if open_page and not webbrowser.open(path.resolve().as_uri()):
        err_console.print(
            f"No web browser opened it here: copy {path} to a machine with one, or open it there.",
            markup=False,
            soft_wrap=True,
        )
