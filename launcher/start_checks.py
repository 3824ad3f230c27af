"""Whether the job can start an execution now: the one list of checks that `run`, `sweep` and
`sweep --dry-run` pass through, in one order, so that a dry run refuses what the sweep would and `run`
and `sweep` cannot drift apart. The GPU quota is the callers' own, after these: a run needs one GPU, a
sweep chooses from it how many tasks run at once (sweep.choose_parallelism)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.cloud import run_v2

from launcher import executions, overrides, staging
from launcher import job as jobs
from launcher.cloud import Clients
from launcher.settings import Settings
from launcher.sweep import GRID_FLAG, Grid


@dataclass(frozen=True)
class Startable:
    job: run_v2.Job
    args: list[str]  # the execution's trainer arguments: the job's, with the settings (and the grid) in place
    notes: list[str]  # fits that run slowly or were not measured, each once, to show before starting


def check(
    clients: Clients,
    settings: Settings,
    sets: Mapping[str, str],
    grid: Grid | None = None,
    *,
    allow_concurrent: bool,
) -> Startable:
    """The job, checked for an execution with `sets` (a sweep's: every task of `grid`), in this order: it
    exists and runs on the settings' GPU; its model fits that GPU with each task's settings; its service
    account can still act; the trainer's sizes fit the staged splits; and, unless `allow_concurrent`, no
    other execution of it runs. A check that fails is a UserError; nothing is changed."""
    job = jobs.current_job(clients, settings)
    jobs.check_gpu(job, settings)
    jobs.check_bucket(job, settings)
    combinations = grid.combinations() if grid is not None else [{}]
    notes: list[str] = []
    for combination in combinations:
        note = jobs.check_fits(job, {**sets, **combination})
        if note and note not in notes:
            notes.append(note)
    jobs.require_service_account(clients, settings, job)
    shared = {**sets, GRID_FLAG: grid.argument()} if grid is not None else sets
    args = overrides.apply(jobs.job_args(job), shared)
    # The size check reads the bucket: once per combination only when the grid varies a size (a grid of
    # learning rates fits the staged splits as its first combination does).
    varied = list(grid.values) if grid is not None else []
    sized = combinations if set(varied) & {key for key, _ in overrides.SIZES} else combinations[:1]
    for combination in sized:
        staging.check_trainer_sizes(
            clients, settings, overrides.apply(args, combination), grid=varied or None
        )
    if not allow_concurrent:
        executions.refuse_concurrent(clients, settings)
    return Startable(job, args, notes)
