"""`gemma-launch sweep`: one execution of the job with one task per combination of a grid of trainer
settings, the task index choosing the combination in the trainer (trainer/sweep.py).

The grid travels as the trainer argument --sweep-grid, in the execution's container overrides, with
RunJobRequest.Overrides.task_count set to the number of combinations. Parallelism is a field of the
job's ExecutionTemplate, not of the overrides (google/cloud/run/v2/job.proto, RunJobRequest.Overrides:
container_overrides, task_count and timeout only; https://cloud.google.com/run/docs/configuring/parallelism):
the job gets the sweep's parallelism for the RunJob and its own back once the execution exists, which
keeps its own copy (Execution.parallelism), so that `up` still finds the job unchanged. Cloud Run holds
a job's parallelism to its own task_count (same page: parallelism may not "exceed the number of tasks"),
so the job's task_count goes along with it for the RunJob.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.cloud import run_v2

from launcher import executions, overrides, quota
from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.settings import Settings
from trainer import sweep as trainer_sweep

GRID_FLAG = "sweep-grid"
# Cloud Run's limit on an execution's tasks (https://cloud.google.com/run/docs/configuring/task-count:
# "up to 10,000 tasks"; the emulator holds run_validation.MAX_TASKS to it).
MAX_TASKS = 10_000


@dataclass(frozen=True)
class Grid:
    values: dict[str, list[str]]

    def combinations(self) -> list[dict[str, str]]:
        """In task index order, as the trainer picks them."""
        return trainer_sweep.combinations(self.values)

    def argument(self) -> str:
        return trainer_sweep.format_grid(self.values)

    def task_args(self, args: Sequence[str]) -> list[list[str]]:
        """Each task's trainer arguments, in task index order, given the execution's `args`: what the
        trainer's parser reads in that task."""
        return [trainer_sweep.task_argv(args, combination) for combination in self.combinations()]


def parse_grid(pairs: Sequence[str], sets: Mapping[str, str]) -> Grid:
    """`--grid KEY=V1,V2` options -> a Grid, each value checked as `run --set KEY=VALUE` is; `sets`: the
    run's --set settings, which may not name a key the grid varies."""
    values: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, listed = pair.partition("=")
        key = key.strip().removeprefix("--")
        items = [item.strip() for item in listed.split(trainer_sweep.VALUES)]
        if not sep or not key or not all(items):
            raise UserError(
                f"--grid {pair!r} is not KEY=VALUE,VALUE,...",
                "Example: --grid learning-rate=1e-4,2e-4,5e-4 (no empty values).",
            )
        if key in values:
            raise UserError(
                f"--grid {key} is given twice.", f"Give it once with every value: --grid {key}=A,B,C."
            )
        if key in sets:
            raise UserError(
                f"{key} is both a --set ({key}={sets[key]}) and a --grid setting.",
                f"Keep one: --grid {key}=... varies it across the tasks, --set fixes it for all of them.",
            )
        if len(set(items)) < len(items):
            raise UserError(
                f"--grid {pair} repeats a value.", "List each value once: the tasks would repeat."
            )
        for item in items:
            overrides.check(key, item, f"--grid {key}={item}")
        values[key] = items
    grid = Grid(values)
    count = len(grid.combinations())
    if count > MAX_TASKS:
        raise UserError(
            f"The grid has {count} combinations: Cloud Run runs at most {MAX_TASKS} tasks in an execution.",
            "Split it into several sweeps, or list fewer values.",
        )
    return grid


@dataclass(frozen=True)
class Parallelism:
    tasks: int  # how many run at once
    why: str  # where that number comes from, for the user


def choose_parallelism(clients: Clients, settings: Settings, tasks: int, asked: int | None) -> Parallelism:
    """How many tasks run at once: `asked`, else what the GPU quota leaves after the job's running
    executions (each running task holds one GPU); more than that is refused before anything starts.
    More than the sweep's tasks is as many as its tasks, which is all they can hold at once."""
    if asked is not None:
        asked = min(asked, tasks)
    if not settings.uses_gpu:
        count = min(asked or tasks, tasks)
        return Parallelism(count, "--parallelism" if asked else "no GPU, so no GPU quota: every task at once")
    try:
        found = quota.read(clients, settings)
    except quota.QuotaUnknown as unknown:
        count = min(asked or 1, tasks)
        return Parallelism(
            count,
            f"--parallelism; the GPU quota is unknown ({unknown})"
            if asked
            else f"the GPU quota is unknown ({unknown}): one task at a time",
        )
    if found is None:  # no GPU quota applies to the job
        return Parallelism(min(asked or tasks, tasks), "--parallelism" if asked else "every task at once")
    held = executions.gpus_held(clients, settings)
    if found.gpus < held + 1:
        quota.require_for_run(clients, settings, held)  # raises, naming the quota to request
    free = int(found.gpus) - held
    taken = f", {held} held by the job's running executions" if held else ""
    if asked is not None and asked > free:
        raise UserError(
            f"--parallelism {asked} needs {asked} {settings.gpu} GPUs at once; {found.describe()}{taken} "
            f"leaves {free}: Cloud Run would fail the execution.",
            f"Use --parallelism {free} or leave it out (the quota's number is the default), or request "
            f"more {found.quota_id} at {found.request_url}",
        )
    count = min(asked or free, tasks)
    if asked:
        return Parallelism(count, f"--parallelism, within {found.describe()}{taken}")
    return Parallelism(count, f"what the GPU quota allows: {found.describe()}{taken}")


def start(
    clients: Clients, settings: Settings, grid: Grid, args: Sequence[str], parallelism: int
) -> run_v2.Execution:
    """One execution, a task per combination, `parallelism` at once."""
    job = clients.jobs.get_job(name=settings.job_name, retry=RETRY)
    own = (job.template.task_count, job.template.parallelism)
    tasks = len(grid.combinations())
    changed = own[1] != parallelism
    if changed:
        _set_tasks(clients, job, tasks, parallelism)
    try:
        return executions.run(clients, settings, args=list(args), tasks=tasks)
    finally:
        if changed:
            _set_tasks(clients, clients.jobs.get_job(name=settings.job_name, retry=RETRY), *own)


def _set_tasks(clients: Clients, job: run_v2.Job, task_count: int, parallelism: int) -> None:
    update = run_v2.Job(job)
    update.template.task_count = task_count
    update.template.parallelism = parallelism
    clients.jobs.update_job(job=update, retry=RETRY).result(timeout=300, retry=RETRY)


def grid_of(execution: run_v2.Execution) -> Grid | None:
    """The grid an execution was started with (its trainer arguments), or None for a plain run."""
    containers = execution.template.containers
    args = list(containers[0].args) if containers else []
    option = f"--{GRID_FLAG}"
    if option not in args or args.index(option) + 1 >= len(args):
        return None
    try:
        return Grid(trainer_sweep.parse_grid(args[args.index(option) + 1]))
    except ValueError:
        return None


def recorded_combinations(results: Mapping[str, Any]) -> list[dict[str, str]]:
    """The combinations of the sweep a task's results.json came from, in task order, read from the
    --sweep-grid it records among its flags; none when it was no sweep's."""
    grid = (results.get("settings") or {}).get("flags", {}).get(GRID_FLAG)
    try:
        return Grid(trainer_sweep.parse_grid(grid)).combinations() if isinstance(grid, str) else []
    except ValueError:
        return []
