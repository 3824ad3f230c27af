"""Cloud Run Admin API v2: Jobs, Executions and Tasks, with executions that really run.

The handlers check a job against Cloud Run's rules (run_validation.py) and against the other services
(the service account, the image, the volumes' buckets, the secrets), store the resources
(run_resources.py) and hand executions to run_execution.py, which runs their tasks as local processes
(run_process.py).

The RunJob operation, as in Cloud Run, is done when the execution is done; its response is the
finished Execution (also when it failed: the Execution's conditions say how). Only the first
container of a task runs: sidecars are not emulated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
from google.cloud import run_v2
from google.longrunning import operations_pb2

from launcher.emulator.access import Access, compute_default_account
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.cloudbuild import CloudBuild
from launcher.emulator.iam import Iam
from launcher.emulator.logging import Logging
from launcher.emulator.operations import Operations
from launcher.emulator.quotas import Quotas
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
from launcher.emulator.run_execution import Executions
from launcher.emulator.run_resources import (
    EXECUTION,
    JOB,
    PARENT,
    TASK,
    RunStore,
    Status,
    created_job,
    dump,
    load,
    mark_cancelling,
    match_name,
    new_execution,
    new_task,
    parent_of,
    secret_name,
    updated_job,
    utc_now,
)
from launcher.emulator.run_validation import fill_defaults, validate_template
from launcher.emulator.secretmanager import SecretManager
from launcher.emulator.state import State
from launcher.emulator.storage import CloudStorage

_JOB_ID = re.compile(r"^[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?$")
# An operation that finishes with its execution is stored as due at the end of time until then.
_NEVER = 253402300799.0


class RunService:
    def __init__(
        self,
        state: State,
        operations: Operations,
        *,
        access: Access,
        iam: Iam,
        storage: CloudStorage,
        secrets: SecretManager,
        registry: ArtifactRegistry,
        builds: CloudBuild,
        quotas: Quotas,
        logging: Logging,
        data_dir: Path,
    ) -> None:
        """`builds` knows where an image's snapshot is; `data_dir` holds each task's HOME."""
        self.state = state
        self.operations = operations
        self.iam = iam
        self.storage = storage
        self.secrets = secrets
        self.registry = registry
        self.store = RunStore(state)
        self.executions = Executions(
            self.store,
            access=access,
            registry=registry,
            builds=builds,
            storage=storage,
            secrets=secrets,
            quotas=quotas,
            logging=logging,
            data_dir=data_dir,
        )

    # ---- Jobs

    def create_job(self, request: run_v2.CreateJobRequest, context: grpc.ServicerContext):
        parent = match_name(PARENT, request.parent, "parent")
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
            created = created_job(job)
            if not request.validate_only:
                tables["run_jobs"][job.name] = dump(created)
        return self.operations.start(request.parent, created, created)

    def get_job(self, request: run_v2.GetJobRequest, context: grpc.ServicerContext) -> run_v2.Job:
        match_name(JOB, request.name, "job")
        return self.store.job(request.name)

    def list_jobs(self, request: run_v2.ListJobsRequest, context: grpc.ServicerContext):
        parent = match_name(PARENT, request.parent, "parent")
        prefix = f"projects/{parent['project']}/locations/"
        jobs = [
            load(run_v2.Job, stored)
            for name, stored in sorted(self.state.table("run_jobs").items())
            if name.startswith(request.parent + "/jobs/")
            or (parent["location"] == "-" and name.startswith(prefix))
        ]
        page, token = _page(jobs, request.page_size, request.page_token)
        return run_v2.ListJobsResponse(jobs=page, next_page_token=token)

    def update_job(self, request: run_v2.UpdateJobRequest, context: grpc.ServicerContext):
        job = run_v2.Job(request.job)
        where = match_name(JOB, job.name, "job")
        stored = self.store.stored_job(job.name)
        if stored is None and not request.allow_missing:
            raise not_found(f"Job {job.name}")
        if stored is not None:
            self.store.check_etag(stored, job.etag)
        self._validate(job, where["project"], where["location"])
        with self.state.transaction() as tables:
            current = tables["run_jobs"].get(job.name)
            updated = created_job(job) if current is None else updated_job(load(run_v2.Job, current), job)
            if not request.validate_only:
                tables["run_jobs"][job.name] = dump(updated)
        return self.operations.start(where["parent"], updated, updated)

    def delete_job(self, request: run_v2.DeleteJobRequest, context: grpc.ServicerContext):
        where = match_name(JOB, request.name, "job")
        job = self.store.job(request.name)
        self.store.check_etag(job, request.etag)
        # A job with an unfinished execution is refused (FAILED_PRECONDITION); finished executions go with
        # their job. The DeleteJob reference (https://cloud.google.com/run/docs/reference/rest/v2/
        # projects.locations.jobs/delete) does not say what becomes of running ones: refusing is the
        # stricter reading, so a client that passes here cancels first (`gcloud run jobs executions
        # cancel`) and never relies on a delete to stop a GPU task.
        running = [
            name
            for name, stored in self.state.table("run_executions").items()
            if name.startswith(job.name + "/") and "completion_time" not in stored
        ]
        if running:
            raise failed_precondition(
                f"Job {job.name} has running executions ({running[0].rsplit('/', 1)[-1]}): cancel them "
                "before deleting the job."
            )
        job.delete_time = utc_now()
        if not request.validate_only:
            with self.state.transaction() as tables:
                tables["run_jobs"].pop(job.name, None)
                for table in ("run_executions", "run_tasks"):
                    for name in [n for n in tables[table] if n.startswith(job.name + "/")]:
                        del tables[table][name]
        return self.operations.start(where["parent"], job, job)

    def run_job(self, request: run_v2.RunJobRequest, context: grpc.ServicerContext):
        where = match_name(JOB, request.name, "job")
        job = self.store.job(request.name)
        self.store.check_etag(job, request.etag)
        execution = new_execution(job, request.overrides)
        for override in request.overrides.container_overrides:
            for var in override.env:
                if "value_source" in var:
                    self._check_secret(var, where["project"], execution.template.service_account)
        if request.validate_only:
            return self.operations.start(where["parent"], execution, execution)
        with self.state.transaction() as tables:
            tables["run_executions"][execution.name] = dump(execution)
            for index in range(execution.task_count):
                task = new_task(execution, index)
                tables["run_tasks"][task.name] = dump(task)
            stored = load(run_v2.Job, tables["run_jobs"][job.name])
            stored.execution_count += 1
            stored.latest_created_execution = run_v2.ExecutionReference(
                name=execution.name,
                create_time=execution.create_time,
                completion_status=Status.EXECUTION_PENDING,
            )
            tables["run_jobs"][job.name] = dump(stored)
        operation = self.operations.start(where["parent"], execution, execution)
        with self.state.transaction() as tables:
            tables["operations"][operation.name]["done_at"] = _NEVER
            tables["run_execution_operations"][execution.name] = operation.name
        self.executions.start(execution)
        return self.operations.get(operations_pb2.GetOperationRequest(name=operation.name), context)

    # ---- Executions

    def get_execution(self, request: run_v2.GetExecutionRequest, context: grpc.ServicerContext):
        match_name(EXECUTION, request.name, "execution")
        return self.store.execution(request.name)

    def list_executions(self, request: run_v2.ListExecutionsRequest, context: grpc.ServicerContext):
        where = match_name(JOB, request.parent, "job")
        if where["job"] != "-":
            self.store.job(request.parent)
        prefix = request.parent + "/executions/" if where["job"] != "-" else where["parent"] + "/jobs/"
        executions = [
            load(run_v2.Execution, stored)
            for name, stored in self.state.table("run_executions").items()
            if name.startswith(prefix)
        ]
        executions.sort(key=lambda e: (e.create_time, e.name), reverse=True)
        page, token = _page(executions, request.page_size, request.page_token)
        return run_v2.ListExecutionsResponse(executions=page, next_page_token=token)

    def delete_execution(self, request: run_v2.DeleteExecutionRequest, context: grpc.ServicerContext):
        where = match_name(EXECUTION, request.name, "execution")
        execution = self.store.execution(request.name)
        self.store.check_etag(execution, request.etag)
        execution.delete_time = utc_now()
        if not request.validate_only:
            self.executions.cancel(execution.name)
            with self.state.transaction() as tables:
                tables["run_executions"].pop(execution.name, None)
                for name in [n for n in tables["run_tasks"] if n.startswith(execution.name + "/")]:
                    del tables["run_tasks"][name]
        return self.operations.start(parent_of(where["job_name"]), execution, execution)

    def cancel_execution(self, request: run_v2.CancelExecutionRequest, context: grpc.ServicerContext):
        where = match_name(EXECUTION, request.name, "execution")
        execution = self.store.execution(request.name)
        self.store.check_etag(execution, request.etag)
        if "completion_time" in execution:
            raise failed_precondition(
                f"Execution {execution.name} has already completed; it cannot be cancelled."
            )
        if not request.validate_only and self.executions.cancel(execution.name):
            execution = self.store.update_execution(execution.name, mark_cancelling)
        return self.operations.start(parent_of(where["job_name"]), execution, execution)

    # ---- Tasks

    def get_task(self, request: run_v2.GetTaskRequest, context: grpc.ServicerContext) -> run_v2.Task:
        match_name(TASK, request.name, "task")
        stored = self.state.table("run_tasks").get(request.name)
        if stored is None:
            raise not_found(f"Task {request.name}")
        return load(run_v2.Task, stored)

    def list_tasks(self, request: run_v2.ListTasksRequest, context: grpc.ServicerContext):
        match_name(EXECUTION, request.parent, "execution")
        self.store.execution(request.parent)
        tasks = [
            load(run_v2.Task, stored)
            for name, stored in self.state.table("run_tasks").items()
            if name.startswith(request.parent + "/tasks/")
        ]
        tasks.sort(key=lambda task: task.index)
        page, token = _page(tasks, request.page_size, request.page_token)
        return run_v2.ListTasksResponse(tasks=page, next_page_token=token)

    # ---- Hooks for other parts of the emulator and for tests

    def kill_task(self, execution: str, task_index: int) -> bool:
        """See Executions.kill_task."""
        return self.executions.kill_task(execution, task_index)

    def shutdown(self) -> None:
        """Stop every running task; called by Emulator.stop()."""
        self.executions.shutdown()

    # ---- Validation against the other services

    def _validate(self, job: run_v2.Job, project: str, location: str) -> None:
        job = run_v2.Job(job)
        fill_defaults(job)
        validate_template(job)
        task = job.template.template
        for volume in task.volumes:
            if "gcs" in volume:
                self._check_bucket(volume.gcs.bucket, location)
        account = task.service_account
        if account and account not in self.iam.state.table("service_accounts"):
            raise permission_denied(
                f"Permission 'iam.serviceaccounts.actAs' denied on service account {account} (or it may not "
                "exist)."
            )
        for container in task.containers:
            for var in container.env:
                if "value_source" in var:
                    self._check_secret(var, project, account)
        for container in task.containers:
            if self.registry.find_image(container.image) is None:
                raise not_found(f"Image '{container.image}'")

    def _check_bucket(self, bucket: str, location: str) -> None:
        stored = self.storage.storage.buckets.get(bucket)
        if stored is None:
            raise failed_precondition(f"The Cloud Storage bucket {bucket!r} of a volume does not exist.")
        if str(stored.get("location", "")).lower() != location.lower():
            raise failed_precondition(
                f"The Cloud Storage bucket {bucket!r} is in {stored.get('location')}; a Cloud Run volume "
                f"needs a bucket in the job's region {location}."
            )

    def _check_secret(self, var: run_v2.EnvVar, project: str, account: str) -> None:
        # No service account in the template: the task runs as the Compute Engine default one.
        account = account or compute_default_account(project)
        ref = var.value_source.secret_key_ref
        secret = secret_name(ref.secret, project)
        try:
            self.secrets.resolve(secret, ref.version or "latest", project=project)
        except ApiError as error:
            raise ApiError(error.code, f"Env {var.name} of the job: {error.message}") from error
        if not self.secrets.can_access(secret, "serviceAccount:" + account):
            raise permission_denied(
                f"Permission denied on secret: {secret}/versions/{ref.version or 'latest'} for service "
                f"account {account}. The service account used must be granted the "
                "'Secret Manager Secret Accessor' role (roles/secretmanager.secretAccessor) at the secret, "
                "project or higher level."
            )

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        jobs = [
            Method("CreateJob", self.create_job, run_v2.CreateJobRequest, operations_pb2.Operation),
            Method("GetJob", self.get_job, run_v2.GetJobRequest, run_v2.Job),
            Method("ListJobs", self.list_jobs, run_v2.ListJobsRequest, run_v2.ListJobsResponse),
            Method("UpdateJob", self.update_job, run_v2.UpdateJobRequest, operations_pb2.Operation),
            Method("DeleteJob", self.delete_job, run_v2.DeleteJobRequest, operations_pb2.Operation),
            Method("RunJob", self.run_job, run_v2.RunJobRequest, operations_pb2.Operation),
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
            ),
            Method(
                "CancelExecution",
                self.cancel_execution,
                run_v2.CancelExecutionRequest,
                operations_pb2.Operation,
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


def _page(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    if page_token and not page_token.isdigit():
        raise invalid(f"Invalid page token {page_token!r}.")
    start = int(page_token or 0)
    end = start + page_size if page_size > 0 else len(items)
    return items[start:end], str(end) if end < len(items) else ""
