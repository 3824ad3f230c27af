"""Executions of a Cloud Run job: start one (run), read them (get, list, state, summary) and their
tasks (tasks_of, find_task, task_state), stop one (cancel), and follow one's log until it ends, or one
task's until that task ends (follow), for `run --follow`, `logs --follow` and the staging job alike.
launcher/job.py owns the job they run: its spec and create-or-update.

follow() opens the live tail before reading the history, and each entry is shown once (launcher/logs.py's
Reader), so nothing is missed or shown twice at the switch. When the execution ends, the tail is closed
and the history read again drains whatever the tail's buffer window still held back.
"""

from __future__ import annotations

import contextlib
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.api_core import exceptions
from google.cloud import run_v2
from google.protobuf import duration_pb2

from launcher import job as jobs
from launcher import logs
from launcher.cloud import POLLING, RETRY, Clients
from launcher.errors import UserError
from launcher.iam_bindings import OBJECT_USER, bucket_grants
from launcher.settings import Settings

EXECUTION_LABEL = "run.googleapis.com/execution_name"


def run(
    clients: Clients,
    settings: Settings,
    *,
    tasks: int | None = None,
    timeout_s: int | None = None,
    args: Sequence[str] | None = None,
    container: str = jobs.CONTAINER,
) -> run_v2.Execution:
    """Start one execution; `args` replace the arguments of `container` for this execution only."""
    overrides = run_v2.RunJobRequest.Overrides()
    if args:
        overrides.container_overrides = [
            run_v2.RunJobRequest.Overrides.ContainerOverride(name=container, args=list(args))
        ]
    if tasks:
        overrides.task_count = tasks
    if timeout_s:
        overrides.timeout = duration_pb2.Duration(seconds=timeout_s)
    request = run_v2.RunJobRequest(name=settings.job_name, overrides=overrides)

    def start(latest_before: str) -> run_v2.Execution:
        # Retried as a whole, not per call: when a RunJob reply was lost the execution exists, and a
        # blind retry would start a second one. A new latest execution is the one we started.
        latest = clients.jobs.get_job(name=settings.job_name, retry=RETRY).latest_created_execution.name
        if latest != latest_before:
            return clients.executions.get_execution(name=latest, retry=RETRY)
        return clients.jobs.run_job(request=request, retry=None).metadata

    try:
        before = clients.jobs.get_job(name=settings.job_name, retry=RETRY).latest_created_execution.name
        return RETRY(start)(before)
    except exceptions.NotFound:
        raise UserError(
            f"Job {settings.job} does not exist in {settings.region}.", "Run `gemma-launch up` first."
        ) from None
    except exceptions.FailedPrecondition as error:
        raise UserError(
            f"Cloud Run refused to run {settings.job}: {error.message}",
            "Run `gemma-launch up` to repair the job.",
        ) from None


def short_name(execution: str) -> str:
    return execution.rsplit("/", 1)[-1]


def find_execution(clients: Clients, name: str) -> run_v2.Execution | None:
    """Cloud Run's record of the execution (full name), or None when it has none: its job was deleted, or
    it is older than the records Cloud Run keeps."""
    try:
        return clients.executions.get_execution(name=name, retry=RETRY)
    except exceptions.NotFound:
        return None


def why_no_record(clients: Clients, settings: Settings) -> str:
    """Why Cloud Run has no record of an execution of the job."""
    # A job that exists may have been made again by `up` since, or may have outlived the record: Cloud
    # Run keeps those of its last 1,000 executions and of every one from the last seven days.
    if jobs.exists(clients, settings):
        return f"job {settings.job} keeps no record of it"
    return f"job {settings.job} deleted"


def get_execution(clients: Clients, settings: Settings, name: str) -> run_v2.Execution:
    """The execution; one that does not exist is a UserError that lists the job's recent ones."""
    found = find_execution(clients, name)
    if found is not None:
        return found
    recent = [short_name(found.name) for found in list_executions(clients, settings, limit=5)]
    hint = recent_hint(recent) if recent else "Start one with `gemma-launch run`."
    raise UserError(f"Execution {short_name(name)} of job {settings.job} does not exist.", hint) from None


def recent_hint(recent: Sequence[str]) -> str:
    """The hint that names the job's recent executions (short names, newest first) for one mistyped."""
    return (
        f"The job's recent executions, newest first: {', '.join(recent)} (`gemma-launch status` shows "
        "their states); leave EXECUTION out for the newest."
    )


def is_done(execution: run_v2.Execution) -> bool:
    return bool(execution.completion_time)


def succeeded(execution: run_v2.Execution) -> bool:
    return (
        is_done(execution)
        and execution.succeeded_count >= execution.task_count
        and execution.failed_count == 0
        and execution.cancelled_count == 0
    )


def state(execution: run_v2.Execution) -> str:
    if not is_done(execution):
        return "Running" if execution.start_time else "Pending"
    if execution.cancelled_count:
        return "Cancelled"
    return "Succeeded" if succeeded(execution) else "Failed"


def why(execution: run_v2.Execution) -> str:
    """Why a finished execution did not succeed: its Completed condition's message; "" otherwise."""
    if not is_done(execution) or succeeded(execution):
        return ""
    for condition in execution.conditions:
        if condition.type_ == "Completed":
            return condition.message
    return ""


# How a task's start fails when gcsfuse may not mount the bucket as the job's account
# (https://cloud.google.com/storage/docs/cloud-storage-fuse/troubleshooting).
_MOUNT_REFUSED = "Bad credentials for bucket"


def refused_a_new_role(clients: Clients, settings: Settings, execution: run_v2.Execution) -> bool:
    """Whether `execution` failed at its start because the job's account was refused the bucket while
    its policy grants the account roles/storage.objectUser: a role granted minutes ago, not yet in
    effect (https://cloud.google.com/iam/docs/access-change-propagation)."""
    if _MOUNT_REFUSED not in why(execution):
        return False
    member = f"serviceAccount:{settings.service_account_email}"
    policy = clients.storage.bucket(settings.bucket).get_iam_policy(requested_policy_version=3, retry=RETRY)
    return bucket_grants(policy, member, OBJECT_USER)


def tasks_of(clients: Clients, execution: str) -> list[run_v2.Task]:
    return list(clients.tasks.list_tasks(parent=execution, retry=RETRY))


def find_task(tasks: list[run_v2.Task], index: int) -> run_v2.Task | None:
    """Task `index` among an execution's tasks; None while Cloud Run has not created it yet."""
    return next((task for task in tasks if task.index == index), None)


# A Task's completion_time is set once it has completed, and its Completed condition says how, with the
# error when it did not succeed (Task, https://cloud.google.com/run/docs/reference/rest/v2/
# projects.locations.jobs.executions.tasks).
def task_state(task: run_v2.Task | None) -> str:
    if task is None or not task.start_time:
        return "Pending"
    if not task.completion_time:
        return "Running"
    succeeded = _task_completed(task).state == run_v2.Condition.State.CONDITION_SUCCEEDED
    return "Succeeded" if succeeded else "Failed"


def task_why(task: run_v2.Task | None) -> str:
    """Why a finished task did not succeed: its Completed condition's message; "" otherwise."""
    return _task_completed(task).message if task is not None and task_state(task) == "Failed" else ""


def _task_completed(task: run_v2.Task) -> run_v2.Condition:
    found = [condition for condition in task.conditions if condition.type_ == "Completed"]
    return found[0] if found else run_v2.Condition()


def running(clients: Clients, settings: Settings) -> list[run_v2.Execution]:
    """The job's executions that have not finished, newest first."""
    return [found for found in list_executions(clients, settings, limit=100) if not is_done(found)]


def refuse_concurrent(clients: Clients, settings: Settings) -> None:
    """A UserError when an execution of the job is still running: two would train side by side, each
    paying for its GPU, usually by accident (a Ctrl-C stops following, not the execution)."""
    unfinished = running(clients, settings)
    if not unfinished:
        return
    newest = short_name(unfinished[0].name)
    others = f" (and {len(unfinished) - 1} more)" if len(unfinished) > 1 else ""
    raise UserError(
        f"Execution {newest}{others} of job {settings.job} is still {state(unfinished[0]).lower()}.",
        f"Follow it with `gemma-launch logs {newest} --follow`, stop it with `gemma-launch cancel "
        f"{newest}`, or pass --allow-concurrent to start another one alongside it.",
    )


@dataclass(frozen=True)
class Cancelled:
    execution: run_v2.Execution
    status: str  # cancelled | cancelling (asked, not stopped yet) | unchanged (it had already finished)


def cancel(clients: Clients, settings: Settings, name: str, wait_s: float = 60.0) -> Cancelled:
    """Cancel an execution and wait up to `wait_s` for it to stop; one already finished is left alone."""
    execution = get_execution(clients, settings, name)
    if is_done(execution):
        return Cancelled(execution, "unchanged")
    # FailedPrecondition: it finished between our read and the cancel; the read below says how.
    with contextlib.suppress(exceptions.FailedPrecondition):
        clients.executions.cancel_execution(name=name, retry=RETRY).result(
            timeout=300, retry=RETRY, polling=POLLING
        )
    deadline = time.monotonic() + wait_s
    while True:
        execution = get_execution(clients, settings, name)
        if is_done(execution):
            return Cancelled(execution, "cancelled" if execution.cancelled_count else "unchanged")
        if time.monotonic() >= deadline:
            return Cancelled(execution, "cancelling")
        time.sleep(1.0)


def list_executions(clients: Clients, settings: Settings, limit: int) -> list[run_v2.Execution]:
    try:
        pages = clients.executions.list_executions(parent=settings.job_name, retry=RETRY)
        return [execution for _, execution in zip(range(limit), pages, strict=False)]
    except exceptions.NotFound:
        raise UserError(
            f"Job {settings.job} does not exist in {settings.region}.", "Run `gemma-launch up` first."
        ) from None


def gpus_held(clients: Clients, settings: Settings) -> int:
    """GPUs the job's unfinished executions hold: one per task running at once."""
    return sum(e.parallelism for e in list_executions(clients, settings, limit=100) if not is_done(e))


def summary(execution: run_v2.Execution) -> dict[str, Any]:
    """The execution as every --json shows it: times ISO 8601 in UTC, durations in whole seconds (`_s`),
    money in USD (`_usd`), as README.md describes `--json`."""
    started = execution.start_time if execution.start_time else None
    ended = execution.completion_time if execution.completion_time else None
    duration_s = int(((ended or datetime.now(UTC)) - started).total_seconds()) if started else None
    return {
        "execution": short_name(execution.name),
        "state": state(execution),
        "tasks": execution.task_count,
        "succeeded": execution.succeeded_count,
        "failed": execution.failed_count,
        "retried": execution.retried_count,
        "started": started.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if started else None,
        "duration_s": duration_s,
        "why": why(execution),
    }


def execution_filter(settings: Settings, execution: str, task: int | None = None) -> str:
    """The execution's entries; `task`: only that task's (Cloud Run labels each with its index)."""
    found = (
        f'resource.type="cloud_run_job" AND resource.labels.job_name="{settings.job}" '
        f'AND labels."{EXECUTION_LABEL}"="{short_name(execution)}"'
    )
    return found if task is None else f'{found} AND labels."{logs.TASK_LABEL}"="{task}"'


def show_log(
    clients: Clients,
    settings: Settings,
    execution: str,
    emit: Callable[[logs.Line], None],
    task: int | None = None,
) -> int:
    """Emit every line `execution` (`task`: that task of it) has logged so far; how many."""
    reader = logs.Reader(clients, settings.project_id, execution_filter(settings, execution, task))
    entries = reader.poll()
    for entry in entries:
        emit(logs.line(entry))
    return len(entries)


def follow(
    clients: Clients,
    settings: Settings,
    execution: str,
    emit: Callable[[logs.Line], None],
    *,
    poll_s: float = 2.0,
    grace_s: float = 2.0,
    task: int | None = None,
) -> run_v2.Execution:
    """Emit every log line of `execution` until it has ended; returns it as it ended. With `task`: only
    that task's lines, until that task has ended (in a sweep, long before the others may), and the
    execution as it was then. A Ctrl-C (KeyboardInterrupt) reaches the caller: it stops the following,
    not the execution."""
    reader = logs.Reader(clients, settings.project_id, execution_filter(settings, execution, task))
    tail = reader.tail()
    try:
        for entry in reader.poll():
            emit(logs.line(entry))
        next_check = 0.0
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if done_at is None and now >= next_check:
                if _ended(clients, settings, execution, task):
                    # Lines written just before the end may still sit in the tail's buffer window.
                    done_at = now
                next_check = now + poll_s
            if done_at is not None and now - done_at >= grace_s:
                break
            try:
                entry = tail.entries.get(timeout=0.2)
            except queue.Empty:
                continue
            if entry is None:  # the stream ended on the server's side: reopen it, gently
                time.sleep(poll_s)
                tail = reader.tail()
                continue
            if reader.fresh(entry):
                emit(logs.line(entry))
    finally:
        tail.close()
    for entry in reader.poll(everything=True):
        emit(logs.line(entry))
    return get_execution(clients, settings, execution)


def _ended(clients: Clients, settings: Settings, execution: str, task: int | None) -> bool:
    """Whether the execution has ended, or, with `task`, that task (an execution that ended without it,
    cancelled before it started, ends it too)."""
    ended = ("Succeeded", "Failed")
    if task is not None and task_state(find_task(tasks_of(clients, execution), task)) in ended:
        return True
    return is_done(get_execution(clients, settings, execution))
