"""Cloud Run Admin API v2: Jobs, Executions and Tasks, with executions that really run.

RunJob starts each task as a local process (launcher/emulator/tasks.py) from the image's snapshot
directory, the one Cloud Build wrote for the image's digest:

- argv: the container's command, else the image ENTRYPOINT, then the container's args (after the
  overrides), else the image CMD (Kubernetes semantics). A leading python/python3 becomes the
  emulator's own interpreter, which has the project's dependencies installed.
- env: PATH/LANG of the emulator, HOME in a per-task directory, PYTHONUNBUFFERED=1,
  PYTHONPATH=snapshot; then the image env (less PATH and HOME, which name the container's filesystem),
  the container env with the overrides merged over it, the secrets resolved from Secret Manager, the
  CLOUD_RUN_* variables and STORAGE_EMULATOR_HOST.
- Paths: a GCS volume mounted at e.g. /mnt/gcs is what a gcsfuse mount looks like to the process, so
  every occurrence of the mount path as a path prefix in argv and env values is rewritten to the
  bucket's directory in the storage emulator; the image's WORKDIR likewise becomes the snapshot dir.
  After each attempt the files written there are registered as objects of the bucket.
- GPU: the emulator has no Cloud Run GPU to give a task that asks for one, so such a task runs on this
  machine's CPU, and an argv pair `--device cuda` (how the job tells the trainer to insist on the GPU)
  becomes `--device cpu`, with a system log line saying so. Like the interpreter and path rewrites, it
  adapts the container to this machine; nothing else about the job changes.
- stdout/stderr lines go to Logging as they come, with Cloud Run's resource and labels; lifecycle
  lines (exit codes, retries, the execution's end) go to run.googleapis.com/varlog/system.

The RunJob operation, as in Cloud Run, is done when the execution is done; its response is the
finished Execution (also when it failed: the Execution's conditions say how). Only the first
container of a task runs: sidecars are not emulated.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.api import launch_stage_pb2
from google.cloud import run_v2
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2, json_format

from launcher.emulator import local_python
from launcher.emulator.access import compute_default_account
from launcher.emulator.metadata import MetadataServer
from launcher.emulator.quotas import gpu_quota
from launcher.emulator.rpc import (
    ApiError,
    Hub,
    Method,
    already_exists,
    failed_precondition,
    invalid,
    not_found,
    permission_denied,
    service_handler,
)
from launcher.emulator.tasks import Launch, Outcome, TaskRunner

if TYPE_CHECKING:
    from launcher.emulator.server import Emulator

_PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
_JOB = re.compile(
    r"^(?P<parent>projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+))/jobs/(?P<job>[^/]+)$"
)
_EXECUTION = re.compile(r"^(?P<job_name>.+/jobs/(?P<job>[^/]+))/executions/(?P<execution>[^/]+)$")
_TASK = re.compile(r"^(?P<execution_name>.+/executions/[^/]+)/tasks/(?P<task>[^/]+)$")
_JOB_ID = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[^=\s]+$")
_CPU = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<milli>m?)$")
_MEMORY = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

RESERVED_ENV = ("CLOUD_RUN_JOB", "CLOUD_RUN_EXECUTION", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_ATTEMPT")
RESERVED_ENV += ("CLOUD_RUN_TASK_COUNT",)
_RESERVED_LABEL_PREFIXES = ("run.googleapis.com", "cloud.googleapis.com", "serving.knative.dev")
_RESERVED_LABEL_PREFIXES += ("autoscaling.knative.dev",)
GPU_LIMIT = "nvidia.com/gpu"
# accelerator -> (minimum CPUs, minimum memory in bytes, needs a preview launch stage)
# https://cloud.google.com/run/docs/configuring/jobs/gpu ("Supported GPU types"): L4 at least 4 CPU and
# 16 GiB; RTX PRO 6000 (Preview) at least 20 CPU and 80 GiB.
GPU_MINIMUMS = {"nvidia-l4": (4.0, 16 * 2**30, False), "nvidia-rtx-pro-6000": (20.0, 80 * 2**30, True)}
# The RTX PRO 6000 shapes Cloud Run accepts, which the docs leave out: 20 or 22 vCPU ("Must be equal to one
# of 20.0, 22.0") and 80 GiB up to 4 GiB per vCPU, as Cloud Run's validateOnly verdicts answer them.
RTX_CPUS = (20.0, 22.0)
RTX_GIB_PER_CPU = 4
Stage = launch_stage_pb2.LaunchStage
_PREVIEW_STAGES = (Stage.ALPHA, Stage.BETA)
_DEFAULT_RETRIES = 3
_DEFAULT_TIMEOUT_S = 600
# https://cloud.google.com/run/docs/configuring/task-timeout: up to 168 hours; "For tasks using GPUs, the
# maximum available timeout is 12 hours (preview)" ("Long running GPU jobs"), 1 hour at GA.
_MAX_TIMEOUT_S = 168 * 3600
MAX_GPU_TIMEOUT_S = 12 * 3600
GA_GPU_TIMEOUT_S = 3600
# https://cloud.google.com/run/docs/configuring/jobs/cpu: a job takes 1, 2, 4, 6 or 8 vCPU ("You must set a
# minimum of 1 CPU for a Cloud Run job"; "Values greater than 1 must be integer values"; at most 8 vCPU),
# each with the memory range of its row ("vCPU and memory table"), 512 MiB at least in the second
# generation (https://cloud.google.com/run/docs/configuring/jobs/memory-limits), 32 GiB at most.
JOB_MEMORY_RANGES = {
    1.0: (512 * 2**20, 4 * 2**30),
    2.0: (512 * 2**20, 8 * 2**30),
    4.0: (2 * 2**30, 16 * 2**30),
    6.0: (4 * 2**30, 24 * 2**30),
    8.0: (4 * 2**30, 32 * 2**30),
}
_MAX_TASKS = 10_000
# The caller's identity: the emulator takes anonymous credentials, so every change is by the same user.
_CALLER = "developer@localhost"
# An operation that finishes with its execution is stored as due at the end of time until then.
_NEVER = 253402300799.0

Condition = run_v2.Condition
Status = run_v2.ExecutionReference.CompletionStatus


def _now() -> datetime:
    return datetime.now(UTC)


def _dump(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(type(message).pb(message), preserving_proto_field_name=True)


def _load(cls: Any, data: dict[str, Any]) -> Any:
    return cls.wrap(json_format.ParseDict(data, cls.pb()()))


def _match(pattern: re.Pattern[str], name: str, what: str) -> re.Match[str]:
    match = pattern.match(name)
    if not match:
        raise invalid(f"Invalid {what} name {name!r}.")
    return match


def parse_cpu(value: str) -> float:
    """CPU as Kubernetes writes it: "4", "0.5", "4000m"."""
    match = _CPU.match(value)
    if not match:
        raise invalid(f'Invalid CPU limit {value!r}: use a number of CPUs ("4") or millicpu ("4000m").')
    return float(match["value"]) / (1000 if match["milli"] else 1)


def parse_memory(value: str) -> int:
    """Memory in bytes, Kubernetes quantity rules: "16Gi" is 16 * 2**30, "16G" is 16 * 10**9."""
    match = _MEMORY.match(value)
    if not match:
        raise invalid(f'Invalid memory limit {value!r}: use e.g. "512Mi" or "16Gi".')
    return int(float(match["value"]) * _MEMORY_UNITS[match["unit"] or ""])


def _seconds(duration: Any) -> float:
    return duration.total_seconds() if hasattr(duration, "total_seconds") else float(duration)


def uses_gpu(task: run_v2.TaskTemplate) -> bool:
    return bool(task.node_selector.accelerator) or any(
        GPU_LIMIT in c.resources.limits for c in task.containers
    )


def feature_stage(job: run_v2.Job) -> int:
    """The launch stage the job's features need: BETA for a preview GPU or a GPU timeout over 1 h, else GA."""
    task = job.template.template
    if GPU_MINIMUMS.get(task.node_selector.accelerator, (0, 0, False))[2]:
        return Stage.BETA
    if uses_gpu(task) and _seconds(task.timeout) > GA_GPU_TIMEOUT_S:
        return Stage.BETA
    return Stage.GA


def _normalize(job: run_v2.Job) -> None:
    """The job as Cloud Run stores it, so a spec sent twice compares equal to the stored one.

    Job.launch_stage "On read (or output), describes whether the resource uses preview features" (proto
    comment of google.cloud.run.v2.Job.launch_stage): what is stored is the stage the features need, not
    the one asked for (validate_template has held the request to it).
    """
    _fill_defaults(job)
    job.launch_stage = feature_stage(job)


def _fill_defaults(job: run_v2.Job) -> None:
    """The defaults Cloud Run fills."""
    if not job.template.task_count:
        job.template.task_count = 1
    task = job.template.template
    if "max_retries" not in task:
        task.max_retries = _DEFAULT_RETRIES
    if not _seconds(task.timeout):
        task.timeout = duration_pb2.Duration(seconds=_DEFAULT_TIMEOUT_S)
    for container in task.containers:
        container.resources.limits.setdefault("cpu", "1000m")
        container.resources.limits.setdefault("memory", "512Mi")


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


def validate_template(job: run_v2.Job) -> None:
    """The checks Cloud Run makes on the spec itself (INVALID_ARGUMENT), before looking anything up."""
    for key in list(job.labels) + list(job.template.labels):
        if key.split("/")[0].endswith(_RESERVED_LABEL_PREFIXES):
            raise invalid(f"Label {key!r} uses a reserved namespace; Cloud Run API v2 rejects it.")
    # Job.launch_stage proto comment: "Cloud Run supports ALPHA, BETA, and GA".
    if job.launch_stage not in (Stage.LAUNCH_STAGE_UNSPECIFIED, Stage.ALPHA, Stage.BETA, Stage.GA):
        raise invalid(
            f"launch_stage {Stage.Name(job.launch_stage)}: only ALPHA, BETA, GA, or unspecified are "
            "supported."
        )
    template = job.template
    if not 1 <= template.task_count <= _MAX_TASKS:
        raise invalid(f"task_count must be between 1 and {_MAX_TASKS}, got {template.task_count}.")
    if template.parallelism < 0:
        raise invalid(f"parallelism must not be negative, got {template.parallelism}.")
    task = template.template
    if not 0 <= task.max_retries <= 10:
        raise invalid(f"max_retries must be between 0 and 10, got {task.max_retries}.")
    validate_timeout(task.timeout, uses_gpu(task), job.launch_stage)
    if not task.containers:
        raise invalid("The job's task template must have at least one container.")
    volumes = {}
    for volume in task.volumes:
        if volume.name in volumes:
            raise invalid(f"Volume name {volume.name!r} is used twice.")
        if "gcs" in volume and not volume.gcs.bucket:
            raise invalid(f"Volume {volume.name!r}: gcs.bucket is required.")
        volumes[volume.name] = volume
    for number, container in enumerate(task.containers):
        where = f"containers[{number}]"
        if not container.image:
            raise invalid(f"{where}.image: a container image is required.")
        validate_env(container.env, where)
        paths = set()
        for mount in container.volume_mounts:
            if mount.name not in volumes:
                raise invalid(
                    f"{where}.volume_mounts: volume {mount.name!r} is not declared in the template."
                )
            if not mount.mount_path.startswith("/") or mount.mount_path in paths:
                raise invalid(
                    f"{where}.volume_mounts: mount path {mount.mount_path!r} must be absolute and unique."
                )
            paths.add(mount.mount_path)
    _validate_gpu(job)
    for number, container in enumerate(task.containers):
        _validate_resources(container, number, task.node_selector.accelerator)


def validate_timeout(timeout: Any, gpu: bool, stage: int) -> None:
    """Task timeout limits (task-timeout page): 168 h; with a GPU 1 h at GA, 12 h as a Preview."""
    seconds = _seconds(timeout)
    if not 0 < seconds <= _MAX_TIMEOUT_S:
        raise invalid(f"Task timeout must be more than 0 s and at most 168 h, got {seconds:g} s.")
    if gpu and seconds > MAX_GPU_TIMEOUT_S:
        raise invalid(
            f"Invalid task timeout {seconds:g}s: the maximum is {MAX_GPU_TIMEOUT_S}s (12 hours) when using "
            "GPU."
        )
    if gpu and seconds > GA_GPU_TIMEOUT_S and stage not in _PREVIEW_STAGES:
        raise invalid(
            f"Invalid task timeout {seconds:g}s: the maximum allowed time is one hour when using GPU. "
            "The feature Long running GPU jobs is not supported in the declared launch stage. The launch "
            "stage should be specified at least as BETA."
        )


def _gib(size: int) -> str:
    return f"{size // 2**30}Gi" if size % 2**30 == 0 else f"{size // 2**20}Mi"


def _validate_resources(container: run_v2.Container, number: int, accelerator: str) -> None:
    """A container's CPU and memory against Cloud Run's shapes for jobs (see JOB_MEMORY_RANGES, RTX_CPUS)."""
    where = f"spec.template.spec.containers[{number}].resources.limits"
    cpu = parse_cpu(container.resources.limits.get("cpu", "1"))
    memory = parse_memory(container.resources.limits.get("memory", "512Mi"))
    if accelerator == "nvidia-rtx-pro-6000" and GPU_LIMIT in container.resources.limits:
        if cpu not in RTX_CPUS:
            raise invalid(
                f"{where}.cpu: Invalid value specified for cpu. Must be equal to one of 20.0, 22.0 with "
                f"nvidia-rtx-pro-6000, got {cpu:g}."
            )
        high = int(cpu) * RTX_GIB_PER_CPU * 2**30
        if not GPU_MINIMUMS[accelerator][1] <= memory <= high:
            raise invalid(
                f"{where}.memory: Invalid value specified for container memory. For {cpu:.1f} CPU with "
                f"nvidia-rtx-pro-6000, memory must be between 80Gi and {_gib(high)} inclusive."
            )
        return
    if cpu < 1:
        raise invalid(
            f"{where}.cpu: Invalid value specified for cpu. Total cpu < 1 is not supported with gen2 "
            "execution environment."
        )
    if cpu not in JOB_MEMORY_RANGES:
        raise invalid(f"{where}.cpu: Invalid value specified for cpu. Must be equal to one of 1, 2, 4, 6, 8.")
    low, high = JOB_MEMORY_RANGES[cpu]
    if not low <= memory <= high:
        raise invalid(
            f"{where}.memory: Invalid value specified for container memory. For {cpu:.1f} CPU, memory must "
            f"be between {_gib(low)} and {_gib(high)} inclusive."
        )


def validate_env(env: Any, where: str) -> None:
    seen = set()
    for var in env:
        if not _ENV_NAME.match(var.name):
            raise invalid(f"{where}.env: invalid variable name {var.name!r}.")
        if var.name in seen:
            raise invalid(f"{where}.env: variable {var.name!r} is set twice.")
        if var.name in RESERVED_ENV:
            raise invalid(f"{where}.env: {var.name} is reserved; Cloud Run sets it in every task.")
        if "value_source" in var and (var.value or not var.value_source.secret_key_ref.secret):
            raise invalid(
                f"{where}.env: {var.name} needs either a value or a secret_key_ref.secret, not both."
            )
        seen.add(var.name)


def _validate_gpu(job: run_v2.Job) -> None:
    task = job.template.template
    accelerator = task.node_selector.accelerator
    gpu_containers = [c for c in task.containers if GPU_LIMIT in c.resources.limits]
    for container in gpu_containers:
        if container.resources.limits[GPU_LIMIT] != "1":
            raise invalid(
                f"Invalid {GPU_LIMIT} limit {container.resources.limits[GPU_LIMIT]!r}: "
                "Cloud Run supports exactly 1 GPU per instance."
            )
    if gpu_containers and not accelerator:
        raise invalid(
            f"A {GPU_LIMIT} limit needs node_selector.accelerator (nvidia-l4 or nvidia-rtx-pro-6000)."
        )
    if not accelerator:
        return
    if accelerator not in GPU_MINIMUMS:
        raise invalid(f"Unsupported accelerator {accelerator!r}: use one of {', '.join(GPU_MINIMUMS)}.")
    if not gpu_containers:
        raise invalid(
            f"node_selector.accelerator {accelerator!r} needs a container with a {GPU_LIMIT}: 1 limit."
        )
    min_cpu, min_memory, preview = GPU_MINIMUMS[accelerator]
    for container in gpu_containers:
        cpu = parse_cpu(container.resources.limits.get("cpu", "1"))
        memory = parse_memory(container.resources.limits.get("memory", "512Mi"))
        if cpu < min_cpu or memory < min_memory:
            raise invalid(
                f"With {accelerator}, CPU must be at least {min_cpu:g}; memory must be at least "
                f"{min_memory // 2**30}Gi. The container asks for {cpu:g} CPU and {memory / 2**30:.3g} GiB."
            )
    if preview and job.launch_stage not in _PREVIEW_STAGES:
        raise invalid(
            f"The feature accelerator {accelerator!r} is not supported in the declared launch stage on "
            f"resource {job.name}. The launch stage should be specified at least as BETA."
        )


def _condition(type_: str, state: Condition.State, message: str = "", **reason: Any) -> Condition:
    return Condition(type_=type_, state=state, message=message, last_transition_time=_now(), **reason)


@dataclass
class _Run:
    runner: TaskRunner
    thread: threading.Thread | None = None
    cancel_requested: bool = False
    # (project, region, accelerator, zonal redundancy) and how many GPUs its running tasks hold.
    gpu_key: tuple[str, str, str, bool] | None = None
    gpus: int = 0
    refusal: str = ""


@dataclass
class _Context:
    """What every event of one execution needs to name its resources and log lines."""

    project: str
    location: str
    job: str
    execution: str  # the short id, J-xxxxx
    name: str  # the execution's full name
    buckets: list[str] = field(default_factory=list)


class RunService:
    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.state = emulator.state
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._fail_orphans()

    # ---- Jobs

    def create_job(self, request: run_v2.CreateJobRequest, context: grpc.ServicerContext):
        parent = _match(_PARENT, request.parent, "parent")
        if not _JOB_ID.match(request.job_id):
            raise invalid(
                f"Invalid job id {request.job_id!r}: up to 63 lower-case letters, digits and hyphens, "
                "starting with a letter and not ending with a hyphen."
            )
        job = run_v2.Job(request.job)
        job.name = f"{request.parent}/jobs/{request.job_id}"
        self._validate(job, parent["project"], parent["location"])
        with self.state.transaction() as tables:
            if job.name in tables["run_jobs"]:
                raise already_exists(f"Job {job.name}")
            created = self._created(job)
            if not request.validate_only:
                tables["run_jobs"][job.name] = _dump(created)
        return self.emulator.operations.start(request.parent, created, created)

    def get_job(self, request: run_v2.GetJobRequest, context: grpc.ServicerContext) -> run_v2.Job:
        _match(_JOB, request.name, "job")
        return self._job(request.name)

    def list_jobs(self, request: run_v2.ListJobsRequest, context: grpc.ServicerContext):
        parent = _match(_PARENT, request.parent, "parent")
        prefix = f"projects/{parent['project']}/locations/"
        jobs = [
            _load(run_v2.Job, stored)
            for name, stored in sorted(self.state.table("run_jobs").items())
            if name.startswith(request.parent + "/jobs/")
            or (parent["location"] == "-" and name.startswith(prefix))
        ]
        page, token = _page(jobs, request.page_size, request.page_token)
        return run_v2.ListJobsResponse(jobs=page, next_page_token=token)

    def update_job(self, request: run_v2.UpdateJobRequest, context: grpc.ServicerContext):
        job = run_v2.Job(request.job)
        where = _match(_JOB, job.name, "job")
        stored = self._stored_job(job.name)
        if stored is None and not request.allow_missing:
            raise not_found(f"Job {job.name}")
        if stored is not None:
            self._check_etag(stored, job.etag)
        self._validate(job, where["project"], where["location"])
        with self.state.transaction() as tables:
            current = tables["run_jobs"].get(job.name)
            if current is None:
                updated = self._created(job)
            else:
                updated = self._updated(_load(run_v2.Job, current), job)
            if not request.validate_only:
                tables["run_jobs"][job.name] = _dump(updated)
        return self.emulator.operations.start(where["parent"], updated, updated)

    def delete_job(self, request: run_v2.DeleteJobRequest, context: grpc.ServicerContext):
        where = _match(_JOB, request.name, "job")
        job = self._job(request.name)
        self._check_etag(job, request.etag)
        job.delete_time = _now()
        if not request.validate_only:
            executions = [n for n in self.state.table("run_executions") if n.startswith(job.name + "/")]
            for name in executions:
                self._cancel_run(name)
            with self.state.transaction() as tables:
                tables["run_jobs"].pop(job.name, None)
                for table in ("run_executions", "run_tasks"):
                    for name in [n for n in tables[table] if n.startswith(job.name + "/")]:
                        del tables[table][name]
        return self.emulator.operations.start(where["parent"], job, job)

    def run_job(self, request: run_v2.RunJobRequest, context: grpc.ServicerContext):
        where = _match(_JOB, request.name, "job")
        job = self._job(request.name)
        self._check_etag(job, request.etag)
        execution = self._new_execution(job, request.overrides)
        for override in request.overrides.container_overrides:
            for var in override.env:
                if "value_source" in var:
                    self._check_secret(var, where["project"], execution.template.service_account)
        if request.validate_only:
            return self.emulator.operations.start(where["parent"], execution, execution)
        with self.state.transaction() as tables:
            tables["run_executions"][execution.name] = _dump(execution)
            for index in range(execution.task_count):
                task = self._new_task(execution, index)
                tables["run_tasks"][task.name] = _dump(task)
            stored = _load(run_v2.Job, tables["run_jobs"][job.name])
            stored.execution_count += 1
            stored.latest_created_execution = run_v2.ExecutionReference(
                name=execution.name,
                create_time=execution.create_time,
                completion_status=Status.EXECUTION_PENDING,
            )
            tables["run_jobs"][job.name] = _dump(stored)
        operation = self.emulator.operations.start(where["parent"], execution, execution)
        with self.state.transaction() as tables:
            tables["operations"][operation.name]["done_at"] = _NEVER
            tables["run_execution_operations"][execution.name] = operation.name
        self._start(execution)
        return self.emulator.operations.get(operations_pb2.GetOperationRequest(name=operation.name), context)

    # ---- Executions

    def get_execution(self, request: run_v2.GetExecutionRequest, context: grpc.ServicerContext):
        _match(_EXECUTION, request.name, "execution")
        return self._execution(request.name)

    def list_executions(self, request: run_v2.ListExecutionsRequest, context: grpc.ServicerContext):
        where = _match(_JOB, request.parent, "job")
        if where["job"] != "-":
            self._job(request.parent)
        prefix = request.parent + "/executions/" if where["job"] != "-" else where["parent"] + "/jobs/"
        executions = [
            _load(run_v2.Execution, stored)
            for name, stored in self.state.table("run_executions").items()
            if name.startswith(prefix)
        ]
        executions.sort(key=lambda e: (e.create_time, e.name), reverse=True)
        page, token = _page(executions, request.page_size, request.page_token)
        return run_v2.ListExecutionsResponse(executions=page, next_page_token=token)

    def delete_execution(self, request: run_v2.DeleteExecutionRequest, context: grpc.ServicerContext):
        where = _match(_EXECUTION, request.name, "execution")
        execution = self._execution(request.name)
        self._check_etag(execution, request.etag)
        execution.delete_time = _now()
        if not request.validate_only:
            self._cancel_run(execution.name)
            with self.state.transaction() as tables:
                tables["run_executions"].pop(execution.name, None)
                for name in [n for n in tables["run_tasks"] if n.startswith(execution.name + "/")]:
                    del tables["run_tasks"][name]
        return self.emulator.operations.start(_parent_of(where["job_name"]), execution, execution)

    def cancel_execution(self, request: run_v2.CancelExecutionRequest, context: grpc.ServicerContext):
        where = _match(_EXECUTION, request.name, "execution")
        execution = self._execution(request.name)
        self._check_etag(execution, request.etag)
        if "completion_time" in execution:
            raise failed_precondition(
                f"Execution {execution.name} has already completed; it cannot be cancelled."
            )
        if not request.validate_only and self._cancel_run(execution.name):
            execution = self._update_execution(execution.name, _mark_cancelling)
        return self.emulator.operations.start(_parent_of(where["job_name"]), execution, execution)

    # ---- Tasks

    def get_task(self, request: run_v2.GetTaskRequest, context: grpc.ServicerContext) -> run_v2.Task:
        _match(_TASK, request.name, "task")
        stored = self.state.table("run_tasks").get(request.name)
        if stored is None:
            raise not_found(f"Task {request.name}")
        return _load(run_v2.Task, stored)

    def list_tasks(self, request: run_v2.ListTasksRequest, context: grpc.ServicerContext):
        _match(_EXECUTION, request.parent, "execution")
        self._execution(request.parent)
        tasks = [
            _load(run_v2.Task, stored)
            for name, stored in self.state.table("run_tasks").items()
            if name.startswith(request.parent + "/tasks/")
        ]
        tasks.sort(key=lambda task: task.index)
        page, token = _page(tasks, request.page_size, request.page_token)
        return run_v2.ListTasksResponse(tasks=page, next_page_token=token)

    # ---- Hooks for other parts of the emulator and for tests

    def kill_task(self, execution: str, task_index: int) -> bool:
        """SIGKILL the running attempt of a task, as a GPU host's maintenance would end it.

        `execution` is the full name or the short id. Cloud Run counts that as a failed attempt and
        retries it while retries are left. False when that task has no attempt running.
        """
        with self._lock:
            runs = [run for name, run in self._runs.items() if execution in (name, name.rsplit("/", 1)[-1])]
        return any(run.runner.kill(task_index) for run in runs)

    def shutdown(self) -> None:
        """Stop every running task; called by Emulator.stop()."""
        with self._lock:
            names = list(self._runs)
        for name in names:
            self._cancel_run(name)
        with self._lock:
            threads = [run.thread for run in self._runs.values() if run.thread]
        for thread in threads:
            thread.join(timeout=10)

    # ---- Storage of resources

    def _stored_job(self, name: str) -> run_v2.Job | None:
        stored = self.state.table("run_jobs").get(name)
        return None if stored is None else _load(run_v2.Job, stored)

    def _job(self, name: str) -> run_v2.Job:
        job = self._stored_job(name)
        if job is None:
            raise not_found(f"Job {name}")
        return job

    def _execution(self, name: str) -> run_v2.Execution:
        stored = self.state.table("run_executions").get(name)
        if stored is None:
            raise not_found(f"Execution {name}")
        return _load(run_v2.Execution, stored)

    @staticmethod
    def _check_etag(resource: run_v2.Job | run_v2.Execution, etag: str) -> None:
        if etag and etag != resource.etag:
            raise ApiError(
                grpc.StatusCode.ABORTED, f"The etag of {resource.name} does not match: it changed."
            )

    def _update_execution(self, name: str, change: Callable[[run_v2.Execution], None]) -> run_v2.Execution:
        with self.state.transaction() as tables:
            stored = tables["run_executions"].get(name)
            if stored is None:  # deleted while it ran
                return run_v2.Execution(name=name)
            execution = _load(run_v2.Execution, stored)
            change(execution)
            execution.update_time = _now()
            execution.etag = '"' + uuid.uuid4().hex[:24] + '"'
            tables["run_executions"][name] = _dump(execution)
            return execution

    def _update_task(self, name: str, change: Callable[[run_v2.Task], None]) -> None:
        with self.state.transaction() as tables:
            stored = tables["run_tasks"].get(name)
            if stored is not None:
                task = _load(run_v2.Task, stored)
                change(task)
                task.update_time = _now()
                tables["run_tasks"][name] = _dump(task)

    def _created(self, job: run_v2.Job) -> run_v2.Job:
        created = _with_output_of(job, run_v2.Job())
        _normalize(created)
        now = _now()
        created.uid = str(uuid.uuid4())
        created.generation = created.observed_generation = 1
        created.create_time = created.update_time = now
        created.creator = created.last_modifier = _CALLER
        created.terminal_condition = _condition("Ready", Condition.State.CONDITION_SUCCEEDED)
        created.reconciling = False
        created.etag = _etag(created)
        return created

    def _updated(self, stored: run_v2.Job, job: run_v2.Job) -> run_v2.Job:
        updated = _with_output_of(job, stored)
        _normalize(updated)
        if _spec(updated) == _spec(stored):
            return stored
        updated.generation = updated.observed_generation = stored.generation + 1
        updated.update_time = _now()
        updated.last_modifier = _CALLER
        updated.terminal_condition = _condition("Ready", Condition.State.CONDITION_SUCCEEDED)
        updated.etag = _etag(updated)
        return updated

    # ---- Validation against the other services

    def _validate(self, job: run_v2.Job, project: str, location: str) -> None:
        job = run_v2.Job(job)
        _fill_defaults(job)
        validate_template(job)
        task = job.template.template
        for volume in task.volumes:
            if "gcs" in volume:
                self._check_bucket(volume.gcs.bucket, location)
        account = task.service_account
        if account and account not in self.emulator.services["iam"].state.table("service_accounts"):
            raise permission_denied(
                f"Permission 'iam.serviceaccounts.actAs' denied on service account {account} (or it may not "
                "exist)."
            )
        for container in task.containers:
            for var in container.env:
                if "value_source" in var:
                    self._check_secret(var, project, account)
        registry = self.emulator.services.get("registry")
        for container in task.containers:
            if registry is not None and registry.find_image(container.image) is None:
                raise not_found(f"Image '{container.image}'")

    def _check_bucket(self, bucket: str, location: str) -> None:
        stored = self.emulator._storage_server._storage.buckets.get(bucket)
        if stored is None:
            raise failed_precondition(f"The Cloud Storage bucket {bucket!r} of a volume does not exist.")
        if str(stored.get("location", "")).lower() != location.lower():
            raise failed_precondition(
                f"The Cloud Storage bucket {bucket!r} is in {stored.get('location')}; a Cloud Run volume "
                f"needs a bucket in the job's region {location}."
            )

    def _check_secret(self, var: run_v2.EnvVar, project: str, account: str) -> None:
        secrets = self.emulator.services.get("secrets")
        if secrets is None:
            return
        # No service account in the template: the task runs as the Compute Engine default one.
        account = account or compute_default_account(project)
        ref = var.value_source.secret_key_ref
        secret = _secret_name(ref.secret, project)
        try:
            secrets.resolve(secret, ref.version or "latest", project=project)
        except ApiError as error:
            raise ApiError(error.code, f"Env {var.name} of the job: {error.message}") from error
        if not secrets.can_access(secret, "serviceAccount:" + account):
            raise permission_denied(
                f"Permission denied on secret: {secret}/versions/{ref.version or 'latest'} for service "
                f"account {account}. The service account used must be granted the "
                "'Secret Manager Secret Accessor' role (roles/secretmanager.secretAccessor) at the secret, "
                "project or higher level."
            )

    # ---- Executions: creation

    def _new_execution(self, job: run_v2.Job, overrides: run_v2.RunJobRequest.Overrides) -> run_v2.Execution:
        where = _match(_JOB, job.name, "job")
        task = run_v2.TaskTemplate(job.template.template)
        _apply_overrides(task, overrides)
        # An override is held to the job's launch stage: a GPU job at GA cannot run a task over 1 h.
        validate_timeout(task.timeout, uses_gpu(task), job.launch_stage)
        task_count = overrides.task_count or job.template.task_count
        if not 1 <= task_count <= _MAX_TASKS:
            raise invalid(f"overrides.task_count must be between 1 and {_MAX_TASKS}, got {task_count}.")
        short = f"{where['job']}-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        now = _now()
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
            conditions=[_condition("Completed", Condition.State.CONDITION_PENDING)],
            log_uri=_log_uri(where["project"], where["location"], where["job"], short),
            etag='"' + uuid.uuid4().hex[:24] + '"',
        )

    def _new_task(self, execution: run_v2.Execution, index: int) -> run_v2.Task:
        where = _match(_EXECUTION, execution.name, "execution")
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
            conditions=[_condition("Completed", Condition.State.CONDITION_PENDING)],
            log_uri=execution.log_uri,
        )

    # ---- Executions: running

    def _start(self, execution: run_v2.Execution) -> None:
        where = _match(_EXECUTION, execution.name, "execution")
        job = _match(_JOB, where["job_name"], "job")
        context = _Context(job["project"], job["location"], job["job"], where["execution"], execution.name)
        events = _Events(self, context, execution)
        runner = TaskRunner(
            count=execution.task_count,
            parallelism=execution.parallelism,
            max_retries=execution.template.max_retries,
            timeout_s=_seconds(execution.template.timeout),
            launch=events.launch,
            events=events,
        )
        run = _Run(runner)
        run.thread = threading.Thread(
            target=self._execute, args=(run, events), name=f"run-{context.execution}"
        )
        run.thread.daemon = True
        with self._lock:
            self._take_gpus(run, execution, context)
            self._runs[execution.name] = run
        run.thread.start()

    def _take_gpus(self, run: _Run, execution: run_v2.Execution, context: _Context) -> None:
        """Count the execution's GPUs against the project's quota in the region, or mark it refused.

        Each task holds one GPU while it runs, so an execution needs as many as run at once. Cloud Run's
        wording when GPU quota runs out: "Quota exceeded for total allowable count of GPUs per project per
        region." (the revision condition message; GPU quota is per project and region, see quotas.py).
        """
        template = execution.template
        quotas = self.emulator.services.get("quotas")
        if quotas is None or not uses_gpu(template):
            return
        accelerator = template.node_selector.accelerator
        zonal = not template.gpu_zonal_redundancy_disabled
        run.gpu_key = (context.project, context.location, accelerator, zonal)
        in_use = sum(other.gpus for other in self._runs.values() if other.gpu_key == run.gpu_key)
        wanted = in_use + execution.parallelism
        allowed = quotas.gpu_limit(context.project, context.location, accelerator, zonal)
        if wanted > allowed:
            run.refusal = (
                "Quota exceeded for total allowable count of GPUs per project per region. Quota violated: "
                f"{gpu_quota(accelerator, zonal).quota_id} requested: {wanted} allowed: {allowed}"
            )
        else:
            run.gpus = execution.parallelism

    def _execute(self, run: _Run, events: _Events) -> None:
        context = events.context
        try:
            if run.refusal:
                events.system(run.refusal, "ERROR")
                self._finish(events, run.refusal, Condition.ExecutionReason.EXECUTION_REASON_UNDEFINED)
                return
            self._update_execution(context.name, _mark_started)
            try:
                events.prepare()
            except _RunFailure as failure:
                events.system(str(failure), "ERROR")
                self._finish(events, failure=str(failure))
                return
            run.runner.run()
            self._finish(events, failure=events.first_failure)
        finally:
            events.stop_metadata()
            with self._lock:
                self._runs.pop(context.name, None)

    def _finish(
        self,
        events: _Events,
        failure: str,
        reason: Condition.ExecutionReason = Condition.ExecutionReason.NON_ZERO_EXIT_CODE,
    ) -> None:
        """Complete the execution, its job's reference to it and its RunJob operation, at once.

        The closing log line is written first, so whoever sees the execution done finds it in Logging.
        """
        context = events.context
        stored = self.state.table("run_executions").get(context.name)
        snapshot = run_v2.Execution() if stored is None else _load(run_v2.Execution, stored)
        failed_count = snapshot.failed_count or snapshot.task_count - snapshot.succeeded_count
        if self._was_cancelled(context.name):
            status = Status.EXECUTION_CANCELLED
            completed = _condition(
                "Completed",
                Condition.State.CONDITION_FAILED,
                "The execution was cancelled.",
                execution_reason=Condition.ExecutionReason.CANCELLED,
            )
            events.system(f"Execution {context.execution} was cancelled.", "WARNING")
        elif failure:
            status = Status.EXECUTION_FAILED
            completed = _condition(
                "Completed",
                Condition.State.CONDITION_FAILED,
                failure,
                execution_reason=reason,
            )
            events.system(
                f"Execution {context.execution} has failed to complete, {failed_count}/{snapshot.task_count} "
                "tasks failed.",
                "ERROR",
            )
        else:
            status = Status.EXECUTION_SUCCEEDED
            seconds = (_now() - snapshot.start_time).total_seconds() if "start_time" in snapshot else 0.0
            completed = _condition(
                "Completed",
                Condition.State.CONDITION_SUCCEEDED,
                f"Execution completed successfully in {seconds:.1f}s.",
            )
            events.system(f"Execution {context.execution} has completed successfully.", "INFO")

        def complete(execution: run_v2.Execution) -> None:
            execution.completion_time = completed.last_transition_time
            execution.reconciling = False
            execution.running_count = 0
            if status == Status.EXECUTION_FAILED:
                execution.failed_count = failed_count
            execution.conditions = [c for c in execution.conditions if c.type_ != "Completed"] + [completed]

        with self.state.transaction() as tables:
            execution = self._update_execution(context.name, complete)
            job_name = context.name.rsplit("/executions/", 1)[0]
            stored_job = tables["run_jobs"].get(job_name)
            if stored_job is not None:
                job = _load(run_v2.Job, stored_job)
                if job.latest_created_execution.name == context.name:
                    job.latest_created_execution.completion_time = execution.completion_time
                    job.latest_created_execution.completion_status = status
                    tables["run_jobs"][job_name] = _dump(job)
            operation = tables["run_execution_operations"].pop(context.name, None)
            if operation in tables["operations"]:
                tables["operations"][operation] = _finished_operation(operation, execution)

    def _was_cancelled(self, name: str) -> bool:
        with self._lock:
            run = self._runs.get(name)
        return bool(run and run.cancel_requested)

    def _cancel_run(self, name: str) -> bool:
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                return False
            run.cancel_requested = True
        run.runner.cancel()
        return True

    def _fail_orphans(self) -> None:
        """Executions left running by an emulator that stopped (same --data-dir) ended with it."""
        with self.state.transaction() as tables:
            for name, stored in tables["run_executions"].items():
                execution = _load(run_v2.Execution, stored)
                if "completion_time" in execution:
                    continue
                execution.completion_time = _now()
                execution.reconciling = False
                execution.running_count = 0
                execution.conditions = [
                    _condition(
                        "Completed",
                        Condition.State.CONDITION_FAILED,
                        "The emulator stopped while the execution was running.",
                        execution_reason=Condition.ExecutionReason.JOB_STATUS_SERVICE_POLLING_ERROR,
                    )
                ]
                tables["run_executions"][name] = _dump(execution)
                operation = tables["run_execution_operations"].pop(name, None)
                if operation in tables["operations"]:
                    tables["operations"][operation] = _finished_operation(operation, execution)

    def log(self, context: _Context, stream: str, text: str, severity: str, labels: dict[str, str]) -> None:
        logging = self.emulator.services.get("logging")
        if logging is None:
            return
        logging.append(
            f"projects/{context.project}/logs/run.googleapis.com%2F{stream.replace('/', '%2F')}",
            "cloud_run_job",
            {"job_name": context.job, "location": context.location, "project_id": context.project},
            text,
            labels={"run.googleapis.com/execution_name": context.execution, **labels},
            severity=severity,
        )

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        jobs = [
            Method("CreateJob", self.create_job, run_v2.CreateJobRequest, operations_pb2.Operation, True),
            Method("GetJob", self.get_job, run_v2.GetJobRequest, run_v2.Job),
            Method("ListJobs", self.list_jobs, run_v2.ListJobsRequest, run_v2.ListJobsResponse),
            Method("UpdateJob", self.update_job, run_v2.UpdateJobRequest, operations_pb2.Operation, True),
            Method("DeleteJob", self.delete_job, run_v2.DeleteJobRequest, operations_pb2.Operation, True),
            Method("RunJob", self.run_job, run_v2.RunJobRequest, operations_pb2.Operation, True),
        ]
        executions = [
            Method("GetExecution", self.get_execution, run_v2.GetExecutionRequest, run_v2.Execution),
            Method(
                "ListExecutions",
                self.list_executions,
                run_v2.ListExecutionsRequest,
                run_v2.ListExecutionsResponse,
            ),
            Method(
                "DeleteExecution",
                self.delete_execution,
                run_v2.DeleteExecutionRequest,
                operations_pb2.Operation,
                True,
            ),
            Method(
                "CancelExecution",
                self.cancel_execution,
                run_v2.CancelExecutionRequest,
                operations_pb2.Operation,
                True,
            ),
        ]
        tasks = [
            Method("GetTask", self.get_task, run_v2.GetTaskRequest, run_v2.Task),
            Method("ListTasks", self.list_tasks, run_v2.ListTasksRequest, run_v2.ListTasksResponse),
        ]
        return _Handlers(
            [
                service_handler("google.cloud.run.v2.Jobs", jobs, hub),
                service_handler("google.cloud.run.v2.Executions", executions, hub),
                service_handler("google.cloud.run.v2.Tasks", tasks, hub),
            ]
        )


class _RunFailure(Exception):
    """The execution cannot start (image or secret gone since the job was created)."""


class _Events:
    """TaskRunner's events for one execution: resources, counters and log lines."""

    def __init__(self, service: RunService, context: _Context, execution: run_v2.Execution) -> None:
        self.service = service
        self.context = context
        self.execution = execution
        self.first_failure = ""
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._cwd = Path()
        self._rewrites: dict[str, str] = {}
        self.metadata: MetadataServer | None = None

    def prepare(self) -> None:
        """Resolve the image's snapshot, the command, the env and the mounts, once per execution."""
        emulator = self.service.emulator
        container = self.execution.template.containers[0]
        registry, builds = emulator.services.get("registry"), emulator.services.get("builds")
        image = registry.find_image(container.image) if registry else None
        if image is None or builds is None:
            raise _RunFailure(f"Image '{container.image}' not found.")
        snapshot = Path(builds.image_dir(image.uri.rsplit("@", 1)[-1]))
        config_path = snapshot / ".image.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        workdir = config.get("workdir") or ""
        if workdir not in ("", "/"):
            self._rewrites[workdir.rstrip("/")] = str(snapshot)
        account = self.execution.template.service_account or compute_default_account(self.context.project)
        mounts = {mount.name: mount.mount_path for mount in container.volume_mounts}
        for volume in self.execution.template.volumes:
            if "gcs" in volume and volume.name in mounts:
                self._check_mount(volume, account)
                self._check_mount_owner(volume, mounts[volume.name], config.get("user") or "")
                bucket_dir = emulator.bucket_dir(volume.gcs.bucket)
                bucket_dir.mkdir(parents=True, exist_ok=True)
                self._rewrites[mounts[volume.name].rstrip("/")] = str(bucket_dir)
                self.context.buckets.append(volume.gcs.bucket)
        self._rewrites = dict(sorted(self._rewrites.items(), key=lambda item: -len(item[0])))
        if container.command:
            argv = list(container.command) + list(container.args)
        else:
            argv = list(config.get("entrypoint") or []) + list(container.args or config.get("cmd") or [])
        if not argv:
            raise _RunFailure(f"Image '{container.image}' has no entrypoint and the container no command.")
        argv = [self._rewrite(arg) for arg in argv]
        if re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(argv[0])):
            argv[0] = sys.executable
            if problem := local_python.check(argv, snapshot):
                raise _RunFailure(problem)
        accelerator = self.execution.template.node_selector.accelerator
        if accelerator and _on_this_cpu(argv) != argv:
            argv = _on_this_cpu(argv)
            self.system(
                f"Emulated {accelerator}: the task runs on this machine's CPU (--device cpu).", "INFO"
            )
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(snapshot),
        }
        env |= {
            k: self._rewrite(v) for k, v in (config.get("env") or {}).items() if k not in ("PATH", "HOME")
        }
        for var in container.env:
            if "value_source" in var:
                env[var.name] = self._secret(var)
            else:
                env[var.name] = self._rewrite(var.value)
        self.metadata = MetadataServer(emulator.access, self.context.project, account).start()
        env |= self.metadata.environment()
        env |= {
            "CLOUD_RUN_JOB": self.context.job,
            "CLOUD_RUN_EXECUTION": self.context.execution,
            "CLOUD_RUN_TASK_COUNT": str(self.execution.task_count),
            "STORAGE_EMULATOR_HOST": emulator.storage_host,
        }
        self._argv, self._env, self._cwd = argv, env, snapshot

    def _check_mount(self, volume: run_v2.Volume, account: str) -> None:
        """gcsfuse mounts as the job's service account: reading needs storage.objects.list and get,
        writing also create, delete and update (roles/storage.objectUser holds them all;
        https://cloud.google.com/storage/docs/cloud-storage-fuse/mount-bucket#required-roles). A denied
        mount fails the task before the container starts, with gcsfuse's own words
        (https://cloud.google.com/storage/docs/cloud-storage-fuse/troubleshooting)."""
        access = self.service.emulator.access
        bucket = volume.gcs.bucket
        needed = ["storage.objects.list", "storage.objects.get"]
        if not volume.gcs.read_only:
            needed += ["storage.objects.create", "storage.objects.delete", "storage.objects.update"]
        missing = [
            permission
            for permission in needed
            if not access.allowed(
                f"serviceAccount:{account}", permission, self.context.project, f"projects/_/buckets/{bucket}"
            )
        ]
        if missing:
            raise _RunFailure(
                f"Failed to mount Cloud Storage volume '{volume.name}': mountWithArgs: mountWithConn: "
                f"fs.NewServer: create file system: SetUpBucket: OpenBucket: Bad credentials for bucket "
                f"{bucket}: permission denied ({account} lacks {', '.join(missing)} on gs://{bucket})."
            )

    @staticmethod
    def _check_mount_owner(volume: run_v2.Volume, path: str, user: str) -> None:
        """gcsfuse gives every file to the user who mounted it, 0644/0755, unless the uid/gid (or
        file-mode/dir-mode) options say otherwise (https://github.com/GoogleCloudPlatform/gcsfuse/blob/master/docs/semantics.md#permissions-and-ownership).
        An image whose USER is not root then cannot write to a writable mount without uid=<its uid>:
        Cloud Run would start the task and its first write would fail with EACCES; the emulator, which
        runs tasks as its own user, refuses at the start with that reason instead."""
        uid = user.split(":", 1)[0]
        if volume.gcs.read_only or uid in ("", "0", "root"):
            return
        options = {option.partition("=")[0]: option.partition("=")[2] for option in volume.gcs.mount_options}
        if options.get("uid") == uid or options.get("dir-mode", "").endswith("7"):
            return
        raise _RunFailure(
            f"The container runs as user {user}, but the Cloud Storage volume '{volume.name}' at {path} is "
            "owned by root (0755 directories, 0644 files) without uid/gid mount options: every write there "
            f"fails with EACCES (permission denied). Add mount option uid={uid} (and gid) to the volume."
        )

    def stop_metadata(self) -> None:
        if self.metadata is not None:
            self.metadata.stop()
            self.metadata = None

    def system(self, text: str, severity: str, **labels: str) -> None:
        self.service.log(self.context, "varlog/system", text, severity, labels)

    def _rewrite(self, value: str) -> str:
        if not self._rewrites:
            return value
        # One pass over all prefixes, longest first, so a replacement is never rewritten again; a prefix
        # counts only as a whole path component (/mnt/gcs/x and --out=/mnt/gcs, not /mnt/gcsx).
        prefixes = "|".join(re.escape(prefix) for prefix in self._rewrites)
        pattern = rf"(?<![\w./-])({prefixes})(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda match: self._rewrites[match[1]], value)

    def _secret(self, var: run_v2.EnvVar) -> str:
        secrets = self.service.emulator.services.get("secrets")
        ref = var.value_source.secret_key_ref
        if secrets is None:
            raise _RunFailure(f"Secret {ref.secret} of env {var.name} cannot be resolved: no Secret Manager.")
        try:
            value = secrets.resolve(
                _secret_name(ref.secret, self.context.project),
                ref.version or "latest",
                project=self.context.project,
            )
        except ApiError as error:
            raise _RunFailure(f"Secret {ref.secret} of env {var.name}: {error.message}") from error
        return value.decode() if isinstance(value, bytes) else str(value)

    def launch(self, index: int, attempt: int) -> Launch:
        home = self.service.emulator.data_dir / "run" / self.context.execution / f"task{index}"
        home.mkdir(parents=True, exist_ok=True)
        env = self._env | {
            "HOME": str(home),
            "CLOUD_RUN_TASK_INDEX": str(index),
            "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
        }
        return Launch(self._argv, env, self._cwd)

    def _task_name(self, index: int) -> str:
        return f"{self.context.name}/tasks/{self.context.execution}-task{index}"

    @staticmethod
    def _labels(index: int, attempt: int) -> dict[str, str]:
        return {"run.googleapis.com/task_index": str(index), "run.googleapis.com/task_attempt": str(attempt)}

    def line(self, index: int, attempt: int, stream: str, text: str) -> None:
        severity = "INFO" if stream == "stdout" else "ERROR"
        self.service.log(self.context, stream, text, severity, self._labels(index, attempt))

    def attempt_started(self, index: int, attempt: int) -> None:
        def start(task: run_v2.Task) -> None:
            task.start_time = task.start_time if "start_time" in task else _now()
            task.conditions = [_condition("Completed", Condition.State.CONDITION_RECONCILING)]

        self.service._update_task(self._task_name(index), start)

        def running(execution: run_v2.Execution) -> None:
            execution.running_count += 1

        self.service._update_execution(self.context.name, running)

    def attempt_ended(self, index: int, attempt: int, outcome: Outcome, will_retry: bool) -> None:
        labels = self._labels(index, attempt)
        if outcome.error:
            self.system(f"Container failed to start: {outcome.error}", "ERROR", **labels)
        elif outcome.timed_out:
            self.system(
                f"Terminating task because it has reached the maximum timeout of "
                f"{_seconds(self.execution.template.timeout):g} seconds.",
                "WARNING",
                **labels,
            )
        elif outcome.term_signal:
            self.system(f"Container terminated on signal {outcome.term_signal}.", "WARNING", **labels)
        else:
            severity = "INFO" if outcome.exit_code == 0 else "WARNING"
            self.system(f"Container called exit({outcome.exit_code}).", severity, **labels)
        if will_retry:
            self.system(
                f"Task {self._task_name(index).rsplit('/', 1)[-1]} failed on attempt {attempt}; retrying "
                f"(attempt {attempt + 1} of at most {self.execution.template.max_retries + 1}).",
                "WARNING",
                **labels,
            )
        storage = self.service.emulator.services.get("storage")
        for bucket in self.context.buckets if storage is not None else []:
            storage.import_tree(bucket)

        def ended(task: run_v2.Task) -> None:
            task.retried = attempt + (1 if will_retry else 0)
            task.last_attempt_result = run_v2.TaskAttemptResult(
                exit_code=outcome.exit_code,
                term_signal=outcome.term_signal,
                status={"code": 0 if outcome.succeeded else 2, "message": _attempt_message(outcome)},
            )

        self.service._update_task(self._task_name(index), ended)

        def counted(execution: run_v2.Execution) -> None:
            execution.running_count = max(0, execution.running_count - 1)
            execution.retried_count += 1 if will_retry else 0

        self.service._update_execution(self.context.name, counted)

    def task_ended(self, index: int, state: str, outcome: Outcome | None) -> None:
        name = self._task_name(index)
        message = _attempt_message(outcome) if outcome else "The task was cancelled before it started."
        if state == "failed" and not self.first_failure:
            self.first_failure = f"Task {name.rsplit('/', 1)[-1]} failed with message: {message}"
        condition_state = {
            "succeeded": Condition.State.CONDITION_SUCCEEDED,
            "failed": Condition.State.CONDITION_FAILED,
            "cancelled": Condition.State.CONDITION_FAILED,
        }[state]

        def done(task: run_v2.Task) -> None:
            task.completion_time = _now()
            task.reconciling = False
            task.conditions = [
                _condition("Completed", condition_state, "" if state == "succeeded" else message)
            ]

        self.service._update_task(name, done)

        def counted(execution: run_v2.Execution) -> None:
            if state == "succeeded":
                execution.succeeded_count += 1
            elif state == "failed":
                execution.failed_count += 1
            else:
                execution.cancelled_count += 1

        self.service._update_execution(self.context.name, counted)


class _Handlers(grpc.GenericRpcHandler):
    """Several gRPC services behind one entry of Emulator.services."""

    def __init__(self, handlers: list[grpc.GenericRpcHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in self._handlers:
            found = handler.service(handler_call_details)
            if found is not None:
                return found
        return None


def _on_this_cpu(argv: list[str]) -> list[str]:
    """argv with `--device cuda` (or --device=cuda) turned into cpu: the emulated GPU is this CPU."""
    result = list(argv)
    for index, arg in enumerate(result):
        if arg == "--device=cuda":
            result[index] = "--device=cpu"
        elif arg == "--device" and index + 1 < len(result) and result[index + 1] == "cuda":
            result[index + 1] = "cpu"
    return result


def _attempt_message(outcome: Outcome) -> str:
    if outcome.error:
        return f"The container failed to start: {outcome.error}"
    if outcome.timed_out:
        return "The configured timeout was reached."
    if outcome.cancelled:
        return "The task was cancelled."
    if outcome.term_signal:
        return f"The container was terminated by signal {outcome.term_signal}."
    if outcome.exit_code:
        return f"The container exited with an error (exit code {outcome.exit_code})."
    return "Completed."


def _apply_overrides(task: run_v2.TaskTemplate, overrides: run_v2.RunJobRequest.Overrides) -> None:
    for number, override in enumerate(overrides.container_overrides):
        where = f"overrides.container_overrides[{number}]"
        if override.name:
            matching = [c for c in task.containers if c.name == override.name]
            if not matching:
                raise invalid(f"{where}: the job has no container named {override.name!r}.")
            container = matching[0]
        elif len(task.containers) == 1:
            container = task.containers[0]
        else:
            raise invalid(f"{where}: name is required when the job has several containers.")
        validate_env(override.env, where)
        if override.clear_args:
            container.args = []
        if override.args:
            container.args = list(override.args)
        env = {var.name: run_v2.EnvVar(var) for var in container.env}
        env.update({var.name: run_v2.EnvVar(var) for var in override.env})
        container.env = list(env.values())
    if "timeout" in overrides:
        task.timeout = overrides.timeout


def _mark_started(execution: run_v2.Execution) -> None:
    execution.start_time = _now()
    execution.conditions = [c for c in execution.conditions if c.type_ != "Completed"] + [
        _condition("Completed", Condition.State.CONDITION_RECONCILING)
    ]


def _mark_cancelling(execution: run_v2.Execution) -> None:
    execution.conditions = [c for c in execution.conditions if c.type_ != "Completed"] + [
        _condition(
            "Completed",
            Condition.State.CONDITION_RECONCILING,
            "The execution is being cancelled.",
            execution_reason=Condition.ExecutionReason.CANCELLING,
        )
    ]


def _finished_operation(name: str, execution: run_v2.Execution) -> dict[str, Any]:
    """The operations table entry (see operations.py) of a RunJob operation, now done."""
    operation = operations_pb2.Operation(name=name)
    operation.response.Pack(run_v2.Execution.pb(execution))
    operation.metadata.Pack(run_v2.Execution.pb(execution))
    return {"done_at": time.time(), "operation": base64.b64encode(operation.SerializeToString()).decode()}


def _page(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    if page_token and not page_token.isdigit():
        raise invalid(f"Invalid page token {page_token!r}.")
    start = int(page_token or 0)
    end = start + page_size if page_size > 0 else len(items)
    return items[start:end], str(end) if end < len(items) else ""


def _parent_of(job_name: str) -> str:
    return job_name.rsplit("/jobs/", 1)[0]


def _secret_name(secret: str, project: str) -> str:
    return secret if secret.startswith("projects/") else f"projects/{project}/secrets/{secret}"


def _log_uri(project: str, location: str, job: str, execution: str) -> str:
    query = (
        f'resource.type%3D"cloud_run_job"%0Aresource.labels.job_name%3D"{job}"%0A'
        f'resource.labels.location%3D"{location}"%0Alabels."run.googleapis.com/execution_name"%3D"{execution}"'
    )
    return f"https://console.cloud.google.com/logs/viewer?project={project}&advancedFilter={query}"
