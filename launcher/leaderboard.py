"""What `results` shows beyond one run's table: a sweep's leaderboard (one row per task, best first) and
executions side by side (the settings that differ, and the metrics).

A sweep's task i writes under runs/<execution>/task-<i>/ (trainer/sweep.py). Each row's `cost` is what
its task (or execution) cost at Cloud Run's prices (launcher/cost.py), None while it runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from typing import Any

from google.cloud import run_v2

from launcher import cost, executions, kept_costs, past_runs
from launcher import results as run_results
from launcher.cloud import Clients
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.sweep import Grid, grid_of, recorded_combinations
from trainer import flags

# Trainer flags that say where a run reads and writes, or are gemma-launch's own: not what makes two
# runs' results differ.
NOT_COMPARED = {"output-dir", "hf-token", "sweep-grid", "gcs-output-path", "dry-run"}


def task_prefix(execution: str, index: int) -> str:
    return f"{run_results.run_prefix(execution)}/task-{index}"


@dataclass(frozen=True)
class Entry:
    """One task of a sweep, or one execution in a comparison."""

    label: str  # "task 2", or an execution's short name
    settings: dict[str, str]  # the grid's values for a task; every differing flag in a comparison
    state: str  # Succeeded, Failed, Running, Pending
    baseline: dict[str, float] = field(default_factory=dict)  # accuracy, macro_f1, unknown_rate
    final: dict[str, float] = field(default_factory=dict)
    duration_s: float | None = None
    cost: float | None = None  # USD, once finished
    task: int | None = None
    execution: str | None = None  # its short name, as `status --json` names it; a task's is the sweep's

    def document(self) -> dict[str, Any]:
        """As `results --json` prints a row: the cost under the name `status --json` gives it."""
        found = asdict(self)
        found["cost_usd"] = found.pop("cost")
        return found

    @property
    def ranked(self) -> tuple[float, float]:
        return (self.final.get("accuracy", -1.0), self.final.get("macro_f1", -1.0))


def _seconds(resource: run_v2.Task | run_v2.Execution) -> float | None:
    if not resource.start_time or not resource.completion_time:
        return None
    return (resource.completion_time - resource.start_time).total_seconds()


def leaderboard(clients: Clients, settings: Settings, execution: run_v2.Execution, grid: Grid) -> list[Entry]:
    """A row per task: its combination, state, metrics and duration; the best final accuracy (then
    macro-F1) first, tasks without results last in task order; another bucket than the sweep's is an
    error, not a row of dashes per task."""
    elsewhere = run_results.other_bucket(settings, execution)
    if elsewhere is not None:
        raise elsewhere
    tasks = {task.index: task for task in executions.tasks_of(clients, execution.name)}
    per_second = cost.price_per_s(clients, settings, execution)
    entries = []
    for index, combination in enumerate(grid.combinations()):
        found = (
            run_results.read_json(clients, settings, f"{task_prefix(execution.name, index)}/results.json")
            or {}
        )
        task = tasks.get(index)
        seconds = _seconds(task) if task is not None else None
        entries.append(
            Entry(
                label=f"task {index}",
                settings=combination,
                state=executions.task_state(task),
                baseline=found.get("baseline", {}),
                final=found.get("final", {}),
                duration_s=seconds,
                cost=None if seconds is None else seconds * per_second,
                task=index,
                execution=executions.short_name(execution.name),
            )
        )
    return _best_first(entries)


def _best_first(entries: list[Entry]) -> list[Entry]:
    return sorted(
        entries, key=lambda entry: (not entry.final, [-value for value in entry.ranked], entry.task)
    )


def kept_sweep(clients: Clients, settings: Settings, execution: str) -> list[Entry] | None:
    """The leaderboard of a sweep whose execution record is gone (its job deleted), from what its tasks
    wrote to the bucket: a row per combination of the grid their results.json records, Succeeded where
    the task wrote results, else Unknown; durations and costs, which went with the record, estimated from
    each task's results (launcher/kept_costs.py). None when the bucket keeps no sweep of that name."""
    kept = _kept_tasks(clients, settings, execution)
    return None if kept is None else _kept_rows(clients, settings, execution, *kept)


def _kept_tasks(
    clients: Clients, settings: Settings, execution: str
) -> tuple[dict[int, dict[str, Any]], dict[str, Any]] | None:
    """The results.json of each task of a kept sweep that wrote one, by task index, and when the bucket
    wrote each file; None when the bucket keeps no sweep of that name."""
    kept = past_runs.kept_one(clients, settings, execution)
    if kept is None or not kept.tasks_with_results:
        return None
    written = {
        index: run_results.read_json(clients, settings, f"{task_prefix(execution, index)}/results.json") or {}
        for index in kept.tasks_with_results
    }
    return written, kept.written_at


def _kept_rows(
    clients: Clients,
    settings: Settings,
    execution: str,
    written: dict[int, dict[str, Any]],
    written_at: dict[str, datetime | None],
) -> list[Entry]:
    per_second = kept_costs.PerSecond(clients, settings)
    numbers = {
        index: kept_costs.rebuild(found, written_at.get(f"task-{index}/results.json"), per_second)
        for index, found in written.items()
    }
    combinations = next((found for found in map(recorded_combinations, written.values()) if found), [])
    indices = sorted({*range(len(combinations)), *written})
    return _best_first(
        [
            Entry(
                label=f"task {index}",
                settings=combinations[index] if index < len(combinations) else {},
                state="Succeeded" if index in written else "Unknown",
                baseline=written.get(index, {}).get("baseline", {}),
                final=written.get(index, {}).get("final", {}),
                duration_s=numbers.get(index, kept_costs.NOTHING).seconds,
                cost=numbers.get(index, kept_costs.NOTHING).usd,
                task=index,
                execution=executions.short_name(execution),
            )
            for index in indices
        ]
    )


def _flags(args: list[str], short: str) -> dict[str, Any]:
    try:
        parsed = vars(flags.parse_args(args))
    except flags.FlagError as error:
        raise UserError(
            f"Execution {short} ran with trainer arguments this gemma-launch cannot read: {error.message}.",
            "Compare it with the gemma-launch that started it, or leave it out.",
        ) from None
    shown = {name.replace("_", "-"): value for name, value in parsed.items()}
    return {name: value for name, value in shown.items() if name not in NOT_COMPARED}


def compare(clients: Clients, settings: Settings, names: list[str]) -> list[Entry]:
    """Each execution's metrics and the trainer settings in which they differ (a sweep by its best task).

    The settings are read from each execution's own arguments, with the trainer's parser, so that
    defaults count too."""
    columns: list[tuple[Entry, dict[str, Any]]] = []
    for name in names:
        execution = executions.find_execution(clients, name)
        if execution is None:
            columns.append(_kept_column(clients, settings, name))
            continue
        args = list(execution.template.containers[0].args)
        short = executions.short_name(name)
        grid = grid_of(execution)
        if grid is None:
            found = run_results.load(clients, settings, name)
            if found is None:
                raise run_results.no_results(clients, settings, name)
            (spent,) = cost.actual_costs(clients, settings, [execution])
            entry = Entry(
                short,
                {},
                executions.state(execution),
                found["baseline"],
                found["final"],
                _seconds(execution),
                spent,
                execution=short,
            )
        else:
            best = leaderboard(clients, settings, execution, grid)[0]
            if not best.final:
                raise UserError(
                    f"Sweep {short} has no finished task to compare yet "
                    f"({executions.state(execution).lower()}).",
                    f"Follow it with `gemma-launch logs {short} --follow`; "
                    f"`gemma-launch results {short}` shows its tasks.",
                )
            args += [arg for key, value in best.settings.items() for arg in flags.setting_argv(key, value)]
            entry = replace(best, label=f"{short} ({best.label})", settings={}, execution=short)
        columns.append((entry, _flags(args, short)))
    keys = sorted({key for _, found in columns for key in found})
    differing = [key for key in keys if len({json.dumps(found.get(key)) for _, found in columns}) > 1]
    return [
        replace(entry, settings={key: _shown(found.get(key)) for key in differing})
        for entry, found in columns
    ]


def _kept_column(clients: Clients, settings: Settings, name: str) -> tuple[Entry, dict[str, Any]]:
    """An execution whose record is gone (its job deleted), compared from what it wrote: its results.json
    (a sweep's: its best task's), whose flags are the arguments it ran with; its duration and cost, which
    went with the record, estimated from those results (launcher/kept_costs.py)."""
    short = executions.short_name(name)
    kept = _kept_tasks(clients, settings, name)
    if kept is None:
        found = run_results.load(clients, settings, name)
        if found is None:
            raise run_results.no_results(clients, settings, name)
        numbers = past_runs.numbers_of(clients, settings, name, found)
        entry = Entry(
            short,
            {},
            "Succeeded",
            found.get("baseline", {}),
            found.get("final", {}),
            numbers.seconds,
            numbers.usd,
            execution=short,
        )
    else:
        best = _kept_rows(clients, settings, name, *kept)[0]
        found = kept[0].get(best.task or 0, {})
        entry = replace(best, label=f"{short} ({best.label})", settings={}, execution=short)
    recorded = found.get("settings", {}).get("flags", {})
    try:
        args = [
            arg
            for key, value in recorded.items()
            if value is not None and key not in NOT_COMPARED
            for arg in flags.setting_argv(key, value)
        ]
    except flags.FlagError as error:
        raise UserError(
            f"Execution {short} ran with trainer settings this gemma-launch cannot read: {error.message}.",
            "Compare it with the gemma-launch that started it, or leave it out.",
        ) from None
    return entry, _flags(args, short)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return "auto" if value is None else str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m{whole % 60:02d}s"


def rebuilt_cost(numbers: kept_costs.Rebuilt) -> str:
    """What a run without a record cost and how long it ran, as its results.json tells them, marked as the
    estimate it is (`results` and `report` show it); else why they are not known."""
    if numbers.seconds is None:
        return numbers.missing
    took = f"ran ≈ {duration(numbers.seconds)}"
    if numbers.usd is None:
        return f"{took}; {numbers.missing}"
    return f"≈ ${numbers.usd:.2f}, {took} ({kept_costs.ESTIMATED})"
