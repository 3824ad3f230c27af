"""`gemma-launch report`: the report page of one or more executions, from what their trainer wrote to the
bucket (results.json, predictions.json, training_curve.json, thumbnails.json), into one HTML file.

The page itself is trainer/report_page.py's, the renderer the trainer uses for its own report.html: it
imports no torch, so the launcher can import it as it imports trainer.flags (docs/architecture.md). The
page of a run whose record is gone shows its cost rebuilt from its results (launcher/kept_costs.py), as
`results` and `status` do; the trainer's own page cannot know the cost.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import quote

from launcher import executions, kept_costs, leaderboard, past_runs, sweep
from launcher import job as jobs
from launcher import results as run_results
from launcher.cloud import EMULATOR_ENV, Clients
from launcher.errors import UserError
from launcher.settings import Settings
from trainer import report_page

PAGE = "report.html"
# Beside results.json: each is optional, since a run of an older trainer has results.json only.
EXTRAS = ("predictions.json", "training_curve.json", "thumbnails.json")
# The authenticated download URL: it opens the object in a browser signed in to Google, from anywhere.
AUTHENTICATED = "https://storage.cloud.google.com"


def run_page(clients: Clients, settings: Settings, execution: str, gone: bool = False) -> dict[str, Any]:
    """The page data of one execution (`gone`: whose record is gone, with its cost rebuilt from its
    results); an execution without results.json is the UserError `results` gives."""
    results = run_results.load(clients, settings, execution)
    if results is None:
        raise run_results.no_results(clients, settings, execution, command="report")
    return _run_page(clients, settings, execution, results, gone)


def _run_page(
    clients: Clients, settings: Settings, execution: str, results: dict[str, Any], gone: bool
) -> dict[str, Any]:
    """The page of a run whose results.json is read."""
    numbers = past_runs.numbers_of(clients, settings, execution, results) if gone else None
    cost = leaderboard.rebuilt_cost(numbers) if numbers is not None else None
    prefix, name = run_results.run_prefix(execution), executions.short_name(execution)
    return _page(clients, settings, prefix, results, name, cost)


def _page(
    clients: Clients,
    settings: Settings,
    prefix: str,
    results: dict[str, Any],
    name: str,
    cost: str | None = None,
) -> dict[str, Any]:
    predictions, curve, thumbnails = (
        run_results.read_json(clients, settings, f"{prefix}/{extra}") for extra in EXTRAS
    )
    return report_page.run_page(results, predictions, curve, thumbnails, name=name, cost=cost)


def pages(clients: Clients, settings: Settings, execution: str, gone: bool = False) -> list[dict[str, Any]]:
    """An execution's page; a sweep's, a page per task that wrote its results (in its own task-<i>/
    directory, trainer/sweep.py), so that they are compared as executions are. The bucket is read first:
    an execution with its own results.json is a run, whose page needs nothing from Cloud Run. `gone`: the
    execution's record is gone, so its page shows the cost rebuilt from its results."""
    results = run_results.load(clients, settings, execution)
    if results is not None:
        return [_run_page(clients, settings, execution, results, gone)]
    found = executions.find_execution(clients, execution)
    if found is None:
        return _kept_pages(clients, settings, execution)
    grid = sweep.grid_of(found)
    if grid is None:
        return [run_page(clients, settings, execution)]
    elsewhere = run_results.other_bucket(settings, found)
    if elsewhere is not None:
        raise elsewhere
    short = executions.short_name(execution)
    tasks = []
    for index, combination in enumerate(grid.combinations()):
        prefix = leaderboard.task_prefix(execution, index)
        results = run_results.read_json(clients, settings, f"{prefix}/results.json")
        if results is not None:
            shown = ", ".join(f"{key}={value}" for key, value in combination.items())
            tasks.append(_page(clients, settings, prefix, results, f"{short} task {index} ({shown})"))
    if not tasks:
        raise UserError(
            f"Sweep {short} has no task with results yet ({executions.state(found).lower()}).",
            f"`gemma-launch results {short}` shows each task's state; `gemma-launch logs {short} --task I` "
            "what one did.",
        )
    return tasks


def _kept_pages(clients: Clients, settings: Settings, execution: str) -> list[dict[str, Any]]:
    """The pages of an execution whose record is gone (its job deleted): a sweep's, a page per task that
    wrote results, named by the combination its results.json records, with its cost rebuilt from them;
    else the run's, or why it has none."""
    kept = past_runs.kept_one(clients, settings, execution)
    if kept is None or not kept.tasks_with_results:
        return [run_page(clients, settings, execution, gone=True)]
    short = executions.short_name(execution)
    per_second = kept_costs.PerSecond(clients, settings)
    tasks = []
    for index in kept.tasks_with_results:
        prefix = leaderboard.task_prefix(execution, index)
        results = run_results.read_json(clients, settings, f"{prefix}/{run_results.RESULTS}")
        if results is not None:
            written = kept.written_at.get(f"task-{index}/{run_results.RESULTS}")
            numbers = kept_costs.rebuild(results, written, per_second)
            combinations = sweep.recorded_combinations(results)
            combination = combinations[index] if index < len(combinations) else {}
            shown = ", ".join(f"{key}={value}" for key, value in combination.items())
            tasks.append(
                _page(
                    clients,
                    settings,
                    prefix,
                    results,
                    f"{short} task {index}" + (f" ({shown})" if shown else ""),
                    leaderboard.rebuilt_cost(numbers),
                )
            )
    return tasks or [run_page(clients, settings, execution, gone=True)]


def write(
    clients: Clients, settings: Settings, names: list[str], out_dir: Path, gone: Collection[str] = ()
) -> Path:
    """Render the executions (full names) into one file in out_dir, a sweep as its tasks; its path.
    `gone`: those of them whose record is gone, whose pages show the cost rebuilt from their results."""
    rendered = [page for name in names for page in pages(clients, settings, name, name in gone)]
    shorts = [executions.short_name(name) for name in names]
    name = f"report-{shorts[0]}.html" if len(shorts) == 1 else f"report-{len(shorts)}-executions.html"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(report_page.render(rendered), encoding="utf-8")
    return path


def link(settings: Settings, execution: str, results: dict[str, Any]) -> str:
    """Where a person opens the trainer's report.html of an execution: the authenticated console URL, or
    on the emulator, whose bucket no browser reaches, the file itself: the emulated task wrote it into the
    bucket's directory in the emulator's data dir, which results.json records as its --output-dir."""
    if os.environ.get(EMULATOR_ENV):
        output_dir = (
            results.get("settings", {})
            .get("flags", {})
            .get("output-dir", f"{jobs.MOUNT_PATH}/{jobs.RUNS_PREFIX}")
        )
        return str(Path(output_dir) / executions.short_name(execution) / PAGE)
    return f"{AUTHENTICATED}/{quote(settings.bucket)}/{quote(run_results.run_prefix(execution))}/{PAGE}"
