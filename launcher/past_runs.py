"""Executions whose record Cloud Run no longer keeps, found from what outlives them.

`down` deletes the job, and its executions with it; a job that `up` makes again starts with none. What
an execution wrote stays: its outputs under runs/<execution>/ in the bucket, which `down` keeps, and its
log in Cloud Logging, which keeps the logs of executions Cloud Run no longer lists, for as long as its
retention (30 days by default) ("The logs and monitoring data for older executions remain available in
Cloud Logging and Cloud Monitoring", https://cloud.google.com/run/docs/execute/jobs). `results`,
`report`, `logs` and `status` fall back on them here, and say that the record is gone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions
from google.cloud import run_v2

from launcher import executions, kept_costs, logs, results, sweep
from launcher import job as jobs
from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.settings import Settings

# What the trainer writes when a run ends (docs/trainer.md): results.json when it succeeded (a sweep's
# tasks, in task-<i>/), failure.json when it stopped on an error a retry cannot fix. The glob syntax of
# objects.list's matchGlob: https://cloud.google.com/storage/docs/json_api/v1/objects/list#list-object-glob
ENDINGS = f"{jobs.RUNS_PREFIX}/**/{{results,failure}}.json"


@dataclass(frozen=True)
class Kept:
    """A run the bucket keeps, as its outputs tell it."""

    name: str  # the execution's short name
    state: str  # Succeeded (results.json), Failed (failure.json), else Unknown
    written: datetime | None  # when the newest of those files was written
    tasks_with_results: tuple[int, ...]  # a sweep's tasks that wrote results.json; () for a run
    # When each of those files was written, by its path under the run's directory ("results.json",
    # "task-0/results.json", "failure.json").
    written_at: dict[str, datetime | None] = field(default_factory=dict, compare=False)

    def summary(self, why: str, numbers: kept_costs.Rebuilt) -> dict[str, object]:
        """As `status --json` shows an execution, with what the bucket cannot tell as None; `why`: the
        error a failed run recorded; `numbers`: its start, run time and cost as its results tell them."""
        rebuilt = numbers.document()
        return {
            "execution": self.name,
            "state": self.state,
            "tasks": None,
            "succeeded": len(self.tasks_with_results) or None,
            "failed": None,
            "retried": None,
            "started": rebuilt["started"],
            "duration_s": rebuilt["duration_s"],
            "why": why,
            "cost_usd": rebuilt["cost_usd"],
        }


@dataclass(frozen=True)
class Found:
    """An execution named by a user, or the newest: its record, or why the record is gone."""

    name: str  # the full name, projects/.../executions/<short>
    execution: run_v2.Execution | None
    gone: str = ""  # why there is no record: "job ... deleted" or "job ... keeps no record of it"

    @property
    def short(self) -> str:
        return executions.short_name(self.name)

    def note(self, source: str) -> str:
        """The one line that says where what follows comes from, when the record is gone."""
        return f"Execution {self.short}: execution record gone ({self.gone}); {source}"

    def outputs_url(self, settings: Settings) -> str:
        return f"gs://{settings.bucket}/{results.run_prefix(self.name)}/"


def full_name(settings: Settings, execution: str) -> str:
    return execution if execution.startswith("projects/") else f"{settings.job_name}/executions/{execution}"


def kept(clients: Clients, settings: Settings) -> list[Kept]:
    """The job's runs whose results.json or failure.json the bucket holds, newest first; none when the
    bucket itself is gone (`down --delete-bucket`). A run is the job's by its name: Cloud Run names an
    execution after its job, `<job>-` and five letters or digits (CLOUD_RUN_EXECUTION,
    https://cloud.google.com/run/docs/container-contract#jobs-env-vars), so another job sharing the
    bucket (or `.cache/`, the warm start) is left out."""
    ours = re.compile(rf"{re.escape(settings.job)}-[a-z0-9]+")
    runs = [run for run in _listed(clients, settings, f"{jobs.RUNS_PREFIX}/") if ours.fullmatch(run.name)]
    return sorted(runs, key=lambda run: run.written.timestamp() if run.written else 0.0, reverse=True)


def _listed(clients: Clients, settings: Settings, under: str) -> list[Kept]:
    found: dict[str, list[tuple[str, datetime | None]]] = {}
    try:
        for blob in clients.storage.list_blobs(
            settings.bucket, prefix=under, match_glob=ENDINGS, retry=RETRY
        ):
            name, _, rest = blob.name.removeprefix(f"{jobs.RUNS_PREFIX}/").partition("/")
            found.setdefault(name, []).append((rest, blob.updated))
    except exceptions.NotFound:
        return []
    return [_kept(name, files) for name, files in found.items()]


def _kept(name: str, files: list[tuple[str, datetime | None]]) -> Kept:
    names = {rest for rest, _ in files}
    tasks = sorted(
        int(rest.split("/")[0].removeprefix("task-"))
        for rest in names
        if rest.endswith("/results.json") and rest.startswith("task-") and rest.split("/")[0][5:].isdigit()
    )
    failed = any(rest.endswith("failure.json") for rest in names)
    if "results.json" in names or (tasks and not failed):
        state = "Succeeded"
    elif failed:
        state = "Failed"
    else:
        state = "Unknown"
    times = [when for _, when in files if when is not None]
    return Kept(name, state, max(times) if times else None, tuple(tasks), dict(files))


def kept_one(clients: Clients, settings: Settings, execution: str) -> Kept | None:
    """What the bucket keeps of one run, whatever its name, or None when it holds nothing under its
    directory."""
    found = next(iter(_listed(clients, settings, f"{results.run_prefix(execution)}/")), None)
    if found is not None:
        return found
    if _holds_anything(clients, settings, execution):
        return Kept(executions.short_name(execution), "Unknown", None, ())
    return None


def _holds_anything(clients: Clients, settings: Settings, execution: str) -> bool:
    try:
        blobs = clients.storage.list_blobs(
            settings.bucket, prefix=f"{results.run_prefix(execution)}/", max_results=1, retry=RETRY
        )
        return any(True for _ in blobs)
    except exceptions.NotFound:
        return False


def finished(clients: Clients, settings: Settings, limit: int, skip: set[str]) -> list[dict[str, Any]]:
    """The results.json of the job's newest `limit` runs (not a sweep's tasks) that the bucket keeps, but
    those of the runs `skip` names (short names): one listing of the names (a request per thousand runs;
    the bucket lists names in alphabetical order, which for Cloud Run's random execution suffixes is no
    order in time, so the newest are chosen by when each file was written), then a read of each."""
    runs = f"{jobs.RUNS_PREFIX}/{settings.job}-"
    try:
        listed = list(
            clients.storage.list_blobs(
                settings.bucket, prefix=runs, match_glob=f"{runs}*/{results.RESULTS}", retry=RETRY
            )
        )
    except exceptions.NotFound:
        return []
    names = {blob.name: blob.name.removeprefix(f"{jobs.RUNS_PREFIX}/").partition("/")[0] for blob in listed}
    newest = sorted(
        (blob for blob in listed if names[blob.name] not in skip),
        key=lambda blob: blob.updated or datetime.min.replace(tzinfo=UTC),
        reverse=True,
    )
    found = []
    for blob in newest[:limit]:
        document = results.load(clients, settings, names[blob.name])
        if isinstance(document, dict):
            found.append(document)
    return found


def find(clients: Clients, settings: Settings, execution: str | None, *, logs_too: bool = False) -> Found:
    """The execution given by short id or full name, or the newest: Cloud Run's record, else, with the
    record gone, the run the bucket keeps (the newest: the one written last). `logs_too`: a run the
    bucket keeps nothing of may still have its log, so it is found by name alone.

    Nothing found anywhere is a UserError that names what was looked at."""
    if execution:
        name = full_name(settings, execution)
        found = executions.find_execution(clients, name)
        if found is not None:
            return Found(found.name, found)
        if logs_too or kept_one(clients, settings, name) is not None:
            return Found(name, None, executions.why_no_record(clients, settings))
        raise nothing_left(clients, settings, name)
    exists = jobs.exists(clients, settings)
    if exists:
        for newest in executions.list_executions(clients, settings, limit=1):
            return Found(newest.name, newest)
    runs = kept(clients, settings)
    if runs:
        return Found(full_name(settings, runs[0].name), None, executions.why_no_record(clients, settings))
    if exists:
        raise UserError(
            f"Job {settings.job} has no executions yet, and {_no_runs(clients, settings)}.",
            "Start one with `gemma-launch run`.",
        )
    raise nothing_at_all(clients, settings)


def nothing_at_all(clients: Clients, settings: Settings) -> UserError:
    """The error when the job does not exist and the bucket keeps no run of it either."""
    return UserError(
        f"Job {settings.job} does not exist in {settings.region}, and {_no_runs(clients, settings)}.",
        "Run `gemma-launch up`, then `gemma-launch run` (give --bucket if `up` used another bucket).",
    )


def _no_runs(clients: Clients, settings: Settings, execution: str = "") -> str:
    """Why the bucket holds no run (of `execution`): it has none there, or it is gone itself."""
    if clients.storage.lookup_bucket(settings.bucket, retry=RETRY) is None:
        return f"bucket gs://{settings.bucket} does not exist (`down --delete-bucket` deletes it)"
    if execution:
        return f"gs://{settings.bucket}/{results.run_prefix(execution)}/ holds nothing of it"
    return f"gs://{settings.bucket}/{jobs.RUNS_PREFIX}/ holds no earlier run"


def nothing_left(clients: Clients, settings: Settings, execution: str, logs: bool = False) -> UserError:
    """The error for an execution of which neither Cloud Run, the bucket nor (`logs`) Cloud Logging
    holds anything: most likely a mistyped name. The hint names the executions and runs there are."""
    short = executions.short_name(execution)
    exists = jobs.exists(clients, settings)
    nor = "; nor does Cloud Logging hold a line of it" if logs else ""
    recorded = []
    if exists:
        recorded = [executions.short_name(e.name) for e in executions.list_executions(clients, settings, 5)]
    others = [run.name for run in kept(clients, settings) if run.name not in recorded][:5]
    hints = []
    if recorded:
        hints.append(executions.recent_hint(recorded))
    if others:
        hints.append(f"Runs the bucket keeps without a record, newest first: {', '.join(others)}.")
    if not hints:
        hints.append(
            "Start one with `gemma-launch run`."
            if exists
            else "Run `gemma-launch up`, then `gemma-launch run` (give --bucket if `up` used another bucket)."
        )
    job = f"job {settings.job}" if exists else f"job {settings.job} (which does not exist now)"
    return UserError(
        f"Execution {short} of {job} does not exist, and {_no_runs(clients, settings, execution)}{nor}.",
        " ".join(hints),
    )


def show_log(
    clients: Clients,
    settings: Settings,
    found: Found,
    emit: Callable[[logs.Line], None],
    task: int | None = None,
) -> int:
    """Emit the log lines Cloud Logging keeps of an execution whose record is gone (they are found by
    its name's label, which needs no record); how many. One that neither the bucket nor Cloud Logging
    holds anything of is the UserError that names where it was looked for."""
    count = executions.show_log(clients, settings, found.name, emit, task)
    if not count and kept_one(clients, settings, found.name) is None:
        raise nothing_left(clients, settings, found.name, logs=True)
    return count


def succeeded(clients: Clients, settings: Settings, execution: str) -> bool:
    """Whether the bucket says the run succeeded: it wrote its results (a sweep: every task that wrote
    any, and none recorded a failure)."""
    run = kept_one(clients, settings, execution)
    return run is not None and run.state == "Succeeded"


def without_record(clients: Clients, settings: Settings, recorded: list[str]) -> list[Kept]:
    """The runs the bucket keeps that are not among `recorded`, every execution the job has a record of
    (as short names): those made before `down`, newest first."""
    return [run for run in kept(clients, settings) if run.name not in recorded]


def summaries(clients: Clients, settings: Settings, runs: list[Kept]) -> list[tuple[dict[str, object], str]]:
    """The runs as `status` shows them, a failed one with the error its trainer recorded in failure.json
    (trainer/failure.py), each with its start, run time and cost rebuilt from its results
    (launcher/kept_costs.py), and why those are not known where they are not."""
    per_second = kept_costs.PerSecond(clients, settings)
    found = []
    for run in runs:
        numbers = _rebuilt(clients, settings, run, per_second)
        why = _failure(clients, settings, run.name) if run.state == "Failed" else ""
        found.append((run.summary(why, numbers), numbers.missing))
    return found


def _rebuilt(
    clients: Clients, settings: Settings, run: Kept, per_second: kept_costs.PerSecond
) -> kept_costs.Rebuilt:
    """A run's numbers from its results.json; a sweep's from each of its tasks' (one read per task)."""
    prefix = results.run_prefix(run.name)
    if not run.tasks_with_results:
        if results.RESULTS not in run.written_at:
            return kept_costs.NOTHING
        found = results.load(clients, settings, run.name)
        return kept_costs.rebuild(found, run.written_at[results.RESULTS], per_second)
    tasks = []
    expected = None
    for index in run.tasks_with_results:
        name = f"task-{index}/{results.RESULTS}"
        found = results.read_json(clients, settings, f"{prefix}/{name}")
        if expected is None and found:
            expected = len(sweep.recorded_combinations(found)) or None
        tasks.append(kept_costs.rebuild(found, run.written_at.get(name), per_second))
    return kept_costs.combined(tasks, expected)


def numbers_of(
    clients: Clients, settings: Settings, execution: str, found: dict[str, Any]
) -> kept_costs.Rebuilt:
    """The start, run time and cost of a run whose record is gone, from its results.json `found` and the
    time the bucket wrote it (one read of its metadata)."""
    blob = clients.storage.bucket(settings.bucket).get_blob(results.results_object(execution), retry=RETRY)
    written = blob.updated if blob is not None else None
    return kept_costs.rebuild(found, written, kept_costs.PerSecond(clients, settings))


def _failure(clients: Clients, settings: Settings, execution: str) -> str:
    stopped = results.recorded_at(clients, settings, f"{results.run_prefix(execution)}/{results.FAILURE}")
    return "" if stopped is None else stopped.message
