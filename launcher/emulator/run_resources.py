"""Cloud Run's resources as the emulator stores them: names, jobs, executions, tasks, their conditions.

RunStore keeps them in the emulator's state; the functions build what CreateJob, UpdateJob and RunJob
store, so a spec sent twice compares equal to the stored one.
"""

from __future__ import annotations

import base64
import hashlib
import random
import re
import string
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2
from google.protobuf import json_format

from launcher.emulator.rpc import ApiError, invalid, not_found
from launcher.emulator.run_validation import (
    MAX_TASKS,
    apply_overrides,
    normalize,
    uses_gpu,
    validate_timeout,
)
from launcher.emulator.state import State

PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
JOB = re.compile(
    r"^(?P<parent>projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+))/jobs/(?P<job>[^/]+)$"
)
EXECUTION = re.compile(r"^(?P<job_name>.+/jobs/(?P<job>[^/]+))/executions/(?P<execution>[^/]+)$")
TASK = re.compile(r"^(?P<execution_name>.+/executions/[^/]+)/tasks/(?P<task>[^/]+)$")
# The caller's identity: the emulator takes anonymous credentials, so every change is by the same user.
_CALLER = "developer@localhost"

Condition = run_v2.Condition
Status = run_v2.ExecutionReference.CompletionStatus


def utc_now() -> datetime:
    return datetime.now(UTC)


def dump(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(type(message).pb(message), preserving_proto_field_name=True)


def load(cls: Any, data: dict[str, Any]) -> Any:
    return cls.wrap(json_format.ParseDict(data, cls.pb()()))


def match_name(pattern: re.Pattern[str], name: str, what: str) -> re.Match[str]:
    match = pattern.match(name)
    if not match:
        raise invalid(f"Invalid {what} name {name!r}.")
    return match


_OUTPUT_ONLY = (
    "uid",
    "generation",
    "create_time",
    "update_time",
    "delete_time",
    "expire_time",
    "creator",
    "last_modifier",
    "observed_generation",
    "terminal_condition",
    "conditions",
    "execution_count",
    "latest_created_execution",
    "reconciling",
    "satisfies_pzs",
    "etag",
)


def _spec(job: run_v2.Job) -> bytes:
    spec = run_v2.Job.pb(job).__class__()
    spec.CopyFrom(run_v2.Job.pb(job))
    for name in _OUTPUT_ONLY:
        spec.ClearField(name)
    return spec.SerializeToString(deterministic=True)


def _with_output_of(job: run_v2.Job, stored: run_v2.Job) -> run_v2.Job:
    """`job`'s spec with `stored`'s output-only fields: what a client sends for those is ignored."""
    merged = type(run_v2.Job.pb(job))()
    merged.CopyFrom(run_v2.Job.pb(job))
    for name in _OUTPUT_ONLY:
        merged.ClearField(name)
    output = type(merged)()
    output.CopyFrom(run_v2.Job.pb(stored))
    for descriptor in output.DESCRIPTOR.fields:
        if descriptor.name not in _OUTPUT_ONLY:
            output.ClearField(descriptor.name)
    merged.MergeFrom(output)
    return run_v2.Job.wrap(merged)


def _etag(job: run_v2.Job) -> str:
    return '"' + hashlib.sha256(_spec(job) + str(job.generation).encode()).hexdigest()[:24] + '"'


def condition(type_: str, state: Condition.State, message: str = "", **reason: Any) -> Condition:
    return Condition(type_=type_, state=state, message=message, last_transition_time=utc_now(), **reason)


@dataclass
class Context:
    """What every event of one execution needs to name its resources and log lines."""

    project: str
    location: str
    job: str
    execution: str  # the short id, J-xxxxx
    name: str  # the execution's full name
    buckets: list[str] = field(default_factory=list)


class RunStore:
    """Jobs, executions and tasks in the emulator's state, as the JSON of their messages."""

    def __init__(self, state: State) -> None:
        self.state = state

    def stored_job(self, name: str) -> run_v2.Job | None:
        stored = self.state.table("run_jobs").get(name)
        return None if stored is None else load(run_v2.Job, stored)

    def job(self, name: str) -> run_v2.Job:
        job = self.stored_job(name)
        if job is None:
            raise not_found(f"Job {name}")
        return job

    def execution(self, name: str) -> run_v2.Execution:
        stored = self.state.table("run_executions").get(name)
        if stored is None:
            raise not_found(f"Execution {name}")
        return load(run_v2.Execution, stored)

    @staticmethod
    def check_etag(resource: run_v2.Job | run_v2.Execution, etag: str) -> None:
        if etag and etag != resource.etag:
            raise ApiError(
                grpc.StatusCode.ABORTED, f"The etag of {resource.name} does not match: it changed."
            )

    def update_execution(self, name: str, change: Callable[[run_v2.Execution], None]) -> run_v2.Execution:
        with self.state.transaction() as tables:
            stored = tables["run_executions"].get(name)
            if stored is None:  # deleted while it ran
                return run_v2.Execution(name=name)
            execution = load(run_v2.Execution, stored)
            change(execution)
            execution.update_time = utc_now()
            execution.etag = '"' + uuid.uuid4().hex[:24] + '"'
            tables["run_executions"][name] = dump(execution)
            return execution

    def update_task(self, name: str, change: Callable[[run_v2.Task], None]) -> None:
        with self.state.transaction() as tables:
            stored = tables["run_tasks"].get(name)
            if stored is not None:
                task = load(run_v2.Task, stored)
                change(task)
                task.update_time = utc_now()
                tables["run_tasks"][name] = dump(task)

    def fail_orphans(self) -> None:
        """Executions left running by an emulator that stopped (same --data-dir) ended with it."""
        with self.state.transaction() as tables:
            for name, stored in tables["run_executions"].items():
                execution = load(run_v2.Execution, stored)
                if "completion_time" in execution:
                    continue
                execution.completion_time = utc_now()
                execution.reconciling = False
                execution.running_count = 0
                execution.conditions = [
                    condition(
                        "Completed",
                        Condition.State.CONDITION_FAILED,
                        "The emulator stopped while the execution was running.",
                        execution_reason=Condition.ExecutionReason.JOB_STATUS_SERVICE_POLLING_ERROR,
                    )
                ]
                tables["run_executions"][name] = dump(execution)
                operation = tables["run_execution_operations"].pop(name, None)
                if operation in tables["operations"]:
                    tables["operations"][operation] = finished_operation(operation, execution)


def created_job(job: run_v2.Job) -> run_v2.Job:
    created = _with_output_of(job, run_v2.Job())
    normalize(created)
    now = utc_now()
    created.uid = str(uuid.uuid4())
    created.generation = created.observed_generation = 1
    created.create_time = created.update_time = now
    created.creator = created.last_modifier = _CALLER
    created.terminal_condition = condition("Ready", Condition.State.CONDITION_SUCCEEDED)
    created.reconciling = False
    created.etag = _etag(created)
    return created


def updated_job(stored: run_v2.Job, job: run_v2.Job) -> run_v2.Job:
    updated = _with_output_of(job, stored)
    normalize(updated)
    if _spec(updated) == _spec(stored):
        return stored
    updated.generation = updated.observed_generation = stored.generation + 1
    updated.update_time = utc_now()
    updated.last_modifier = _CALLER
    updated.terminal_condition = condition("Ready", Condition.State.CONDITION_SUCCEEDED)
    updated.etag = _etag(updated)
    return updated


def new_execution(job: run_v2.Job, overrides: run_v2.RunJobRequest.Overrides) -> run_v2.Execution:
    where = match_name(JOB, job.name, "job")
    task = run_v2.TaskTemplate(job.template.template)
    apply_overrides(task, overrides)
    # An override is held to the job's launch stage: a GPU job at GA cannot run a task over 1 h.
    validate_timeout(task.timeout, uses_gpu(task), job.launch_stage)
    task_count = overrides.task_count or job.template.task_count
    if not 1 <= task_count <= MAX_TASKS:
        raise invalid(f"overrides.task_count must be between 1 and {MAX_TASKS}, got {task_count}.")
    short = f"{where['job']}-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    now = utc_now()
    return run_v2.Execution(
        name=f"{job.name}/executions/{short}",
        uid=str(uuid.uuid4()),
        creator=_CALLER,
        generation=1,
        observed_generation=1,
        labels=dict(job.template.labels),
        annotations=dict(job.template.annotations),
        create_time=now,
        update_time=now,
        launch_stage=job.launch_stage,
        job=where["job"],
        parallelism=min(job.template.parallelism or task_count, task_count),
        task_count=task_count,
        template=task,
        reconciling=True,
        conditions=[condition("Completed", Condition.State.CONDITION_PENDING)],
        log_uri=_log_uri(where["project"], where["location"], where["job"], short),
        etag='"' + uuid.uuid4().hex[:24] + '"',
    )


def new_task(execution: run_v2.Execution, index: int) -> run_v2.Task:
    where = match_name(EXECUTION, execution.name, "execution")
    template = execution.template
    return run_v2.Task(
        name=f"{execution.name}/tasks/{where['execution']}-task{index}",
        uid=str(uuid.uuid4()),
        generation=1,
        observed_generation=1,
        labels=dict(execution.labels),
        create_time=execution.create_time,
        job=execution.job,
        execution=where["execution"],
        containers=list(template.containers),
        volumes=list(template.volumes),
        max_retries=template.max_retries,
        timeout=template.timeout,
        service_account=template.service_account,
        vpc_access=template.vpc_access,
        node_selector=template.node_selector,
        index=index,
        reconciling=True,
        conditions=[condition("Completed", Condition.State.CONDITION_PENDING)],
        log_uri=execution.log_uri,
    )


def mark_started(execution: run_v2.Execution) -> None:
    execution.start_time = utc_now()
    execution.conditions = [c for c in execution.conditions if c.type_ != "Completed"] + [
        condition("Completed", Condition.State.CONDITION_RECONCILING)
    ]


def mark_cancelling(execution: run_v2.Execution) -> None:
    execution.conditions = [c for c in execution.conditions if c.type_ != "Completed"] + [
        condition(
            "Completed",
            Condition.State.CONDITION_RECONCILING,
            "The execution is being cancelled.",
            execution_reason=Condition.ExecutionReason.CANCELLING,
        )
    ]


def finished_operation(name: str, execution: run_v2.Execution) -> dict[str, Any]:
    """The operations table entry (see operations.py) of a RunJob operation, now done."""
    operation = operations_pb2.Operation(name=name)
    operation.response.Pack(run_v2.Execution.pb(execution))
    operation.metadata.Pack(run_v2.Execution.pb(execution))
    return {"done_at": time.time(), "operation": base64.b64encode(operation.SerializeToString()).decode()}


def parent_of(job_name: str) -> str:
    return job_name.rsplit("/jobs/", 1)[0]


def secret_name(secret: str, project: str) -> str:
    return secret if secret.startswith("projects/") else f"projects/{project}/secrets/{secret}"


def _log_uri(project: str, location: str, job: str, execution: str) -> str:
    query = (
        f'resource.type%3D"cloud_run_job"%0Aresource.labels.job_name%3D"{job}"%0A'
        f'resource.labels.location%3D"{location}"%0Alabels."run.googleapis.com/execution_name"%3D"{execution}"'
    )
    return f"https://console.cloud.google.com/logs/viewer?project={project}&advancedFilter={query}"
