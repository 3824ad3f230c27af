"""An execution's results.json and outputs in the bucket: baseline vs fine-tuned metrics, and where the
adapter, the merged model and the confusion matrix are (the trainer's layout, docs/trainer.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from google.api_core import exceptions
from google.cloud import run_v2

from launcher import executions
from launcher import job as jobs
from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.settings import Settings

CONSOLE = "https://console.cloud.google.com/storage/browser"

# What the trainer writes in the run directory when it stops on an error a retry cannot fix
# (trainer/failure.py: {"error", "hint", "attempt"}).
FAILURE = "failure.json"
# What it writes when it succeeds (docs/trainer.md, "results.json").
RESULTS = "results.json"

METRICS = (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("unknown_rate", "Unknown rate"))


def run_prefix(execution: str) -> str:
    """Where the trainer writes an execution's outputs: --output-dir /mnt/gcs/runs plus its name."""
    return f"{jobs.RUNS_PREFIX}/{executions.short_name(execution)}"


def results_object(execution: str) -> str:
    return f"{run_prefix(execution)}/{RESULTS}"


def read_json(clients: Clients, settings: Settings, name: str) -> Any:
    """The JSON document at `name` in the bucket, or None when it has not been written (yet)."""
    blob = clients.storage.bucket(settings.bucket).blob(name)
    try:
        return json.loads(blob.download_as_bytes(retry=RETRY))
    except exceptions.NotFound:
        return None


def load(clients: Clients, settings: Settings, execution: str) -> dict[str, Any] | None:
    """The execution's results.json, or None when it has not been written (yet)."""
    return read_json(clients, settings, results_object(execution))


def recorded_failure(
    clients: Clients, settings: Settings, execution: str, task: int | None = None
) -> UserError | None:
    """The error a retry cannot fix that the trainer recorded for the execution (trainer/failure.py); for
    a sweep, the first task's that recorded one, in its task-<i>/ directory (trainer/sweep.py), or with
    `task`, that task's."""
    found = recorded_at(clients, settings, f"{run_prefix(execution)}/{FAILURE}")
    if found is not None:
        return found
    tasks = executions.get_execution(clients, settings, execution).task_count
    if tasks == 1:
        return None
    for index in range(tasks) if task is None else (task,):
        found = recorded_at(clients, settings, f"{run_prefix(execution)}/task-{index}/{FAILURE}")
        if found is not None:
            return found if task is not None else UserError(f"(task {index}) {found.message}", found.hint)
    return None


def recorded_at(clients: Clients, settings: Settings, name: str) -> UserError | None:
    """The error (and hint) a failure.json at `name` in the bucket records, or None when there is none."""
    blob = clients.storage.bucket(settings.bucket).blob(name)
    try:
        document = json.loads(blob.download_as_bytes(retry=RETRY))
        return UserError(str(document["error"]), str(document.get("hint") or ""))
    except (exceptions.NotFound, ValueError, KeyError, TypeError):
        return None


def rows(results: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, baseline, fine-tuned, change) for each metric present in both evaluations."""
    baseline, final = results.get("baseline", {}), results.get("final", {})
    return [
        (label, baseline[key], final[key], final[key] - baseline[key])
        for key, label in METRICS
        if key in baseline and key in final
    ]


def other_bucket(settings: Settings, execution: run_v2.Execution) -> UserError | None:
    """The error to give when the execution's job mounts a bucket other than settings.bucket, where it
    wrote its outputs; None when it mounts that one."""
    mounted = [volume.gcs.bucket for volume in execution.template.volumes if volume.gcs.bucket]
    if not mounted or settings.bucket in mounted:
        return None
    return UserError(
        f"Execution {executions.short_name(execution.name)} wrote its outputs to gs://{mounted[0]}/, not to "
        f"bucket {settings.bucket}.",
        f"Give --bucket {mounted[0]}, the bucket its job mounts (or set BUCKET_NAME or bucket in "
        "gemma-launch.toml as `up` had it).",
    )


def no_results(clients: Clients, settings: Settings, execution: str, command: str = "results") -> UserError:
    """Why an execution has no results.json, from its state; `command`: the one to run again once it has."""
    found = executions.find_execution(clients, execution)
    short = executions.short_name(execution)
    where = f"gs://{settings.bucket}/{results_object(execution)}"
    if found is None:
        return _no_results_left(clients, settings, execution, where)
    if not executions.is_done(found):
        return UserError(
            f"Execution {short} is still {executions.state(found).lower()}: it writes {where} when "
            "training ends.",
            f"Follow it with `gemma-launch logs {short} --follow`, then run "
            f"`gemma-launch {command} {short}`.",
        )
    if executions.state(found) == "Cancelled":  # someone stopped it: nothing to see in its log or to fix
        return UserError(
            f"Execution {short} was cancelled before it wrote results.",
            f"`gemma-launch status` lists the job's executions, and `gemma-launch {command} EXECUTION` shows "
            "one that succeeded; `gemma-launch run` starts a new one.",
        )
    if not executions.succeeded(found):
        why = executions.why(found)
        verdict = executions.state(found).lower()
        stopped = recorded_failure(clients, settings, execution)
        if stopped is not None:
            return UserError(
                f"Execution {short} {verdict}, so it has no results: the trainer stopped on an error a retry "
                f"cannot fix: {stopped.message}",
                f"{stopped.hint} Then start a new execution with `gemma-launch run`.".strip(),
            )
        return UserError(
            f"Execution {short} {verdict}, so it has no results" + (f": {why}" if why else "."),
            f"See what happened with `gemma-launch logs {short}`; once fixed, start a new execution with "
            "`gemma-launch run`.",
        )
    elsewhere = other_bucket(settings, found)
    if elsewhere is not None:
        return elsewhere
    return UserError(
        f"Execution {short} succeeded but wrote no {where}.",
        f"Its trainer wrote its outputs elsewhere: the job's --output-dir shows in the argv at the top of "
        f"`gemma-launch logs {short}`; `gemma-launch up` sets it back to /mnt/gcs/runs.",
    )


def _no_results_left(clients: Clients, settings: Settings, execution: str, where: str) -> UserError:
    """Why an execution whose record is gone (its job deleted) has no results.json: what the trainer
    recorded when it failed, else that the bucket cannot tell how it ended."""
    short = executions.short_name(execution)
    gone = executions.why_no_record(clients, settings)
    stopped = recorded_at(clients, settings, f"{run_prefix(execution)}/{FAILURE}")
    if stopped is not None:
        return UserError(
            f"Execution {short} failed, so it has no results (its execution record is gone: {gone}): the "
            f"trainer stopped on an error a retry cannot fix: {stopped.message}",
            f"{stopped.hint} Then start a new execution with `gemma-launch run`.".strip(),
        )
    return UserError(
        f"Execution {short} wrote no {where}, and its execution record is gone ({gone}): how it ended is "
        "not known.",
        f"`gemma-launch logs {short}` shows its log, which Cloud Logging keeps (30 days by default); "
        "`gemma-launch status` lists the runs the bucket keeps.",
    )


@dataclass(frozen=True)
class Output:
    label: str
    url: str  # gs://...; a folder ends with /
    console: str  # the Cloud Console page of that object or folder
    present: bool
    note: str  # how to use it, or how to get it when absent


def outputs(clients: Clients, settings: Settings, execution: str) -> list[Output]:
    """Where the adapter, the merged model, results.json and the confusion matrix of an execution are."""
    bucket = clients.storage.bucket(settings.bucket)
    prefix = run_prefix(execution)

    def exists(name: str) -> bool:
        return bucket.get_blob(f"{prefix}/{name}", retry=RETRY) is not None

    def place(label: str, name: str, probe: str, note: str, absent: str) -> Output:
        """`name` is "" or ends with / for a folder; `probe` is the object that shows it was written."""
        path = f"{settings.bucket}/{prefix}/{name}"
        if name == "" or name.endswith("/"):
            page = f"{CONSOLE}/{quote(path.rstrip('/'))}"
        else:
            page = f"{CONSOLE}/_details/{quote(path)}"
        present = exists(probe)
        return Output(
            label,
            f"gs://{path}",
            f"{page}?project={settings.project_id}",
            present,
            note if present else absent,
        )

    return [
        place(
            "adapter",
            "",
            "adapter_model.safetensors",
            "LoRA adapter and processor: PeftModel.from_pretrained(base_model, this folder)",
            "not written (the execution did not get as far as saving it)",
        ),
        place(
            "merged model",
            "merged/",
            "merged/config.json",
            "a plain Gemma 3 checkpoint: from_pretrained(this folder)",
            "not written: the run had no --merge; `gemma-launch run --set merge=true` writes one",
        ),
        place("results.json", "results.json", "results.json", "the metrics and every setting", "absent"),
        place(
            "confusion matrix",
            "confusion_matrix.png",
            "confusion_matrix.png",
            "true vs predicted breed after fine-tuning",
            "absent",
        ),
    ]
