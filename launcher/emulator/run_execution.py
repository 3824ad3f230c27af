"""Executions that really run: one thread per execution drives its tasks through TaskRunner.

An execution counts its GPUs against the project's quota, prepares its tasks' process (run_process.py),
runs them with retries and a timeout, and keeps the execution, its tasks and its job's reference to it
current in the state. stdout/stderr lines go to Logging as they come, with Cloud Run's resource and
labels; lifecycle lines (exit codes, retries, the execution's end) go to run.googleapis.com/varlog/system.
After each attempt the files written to a GCS volume are registered as objects of the bucket.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from google.cloud import run_v2

from launcher.emulator.access import Access
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.cloudbuild import CloudBuild
from launcher.emulator.logging import Logging
from launcher.emulator.quotas import Quotas, gpu_quota
from launcher.emulator.run_process import RunFailure, TaskProcess
from launcher.emulator.run_resources import (
    EXECUTION,
    JOB,
    Condition,
    Context,
    RunStore,
    Status,
    condition,
    dump,
    finished_operation,
    load,
    mark_started,
    match_name,
    utc_now,
)
from launcher.emulator.run_validation import duration_seconds, uses_gpu
from launcher.emulator.secretmanager import SecretManager
from launcher.emulator.storage import CloudStorage
from launcher.emulator.tasks import Outcome, TaskRunner


@dataclass
class _Run:
    runner: TaskRunner
    thread: threading.Thread | None = None
    cancel_requested: bool = False
    # (project, region, accelerator, zonal redundancy) and how many GPUs its running tasks hold.
    gpu_key: tuple[str, str, str, bool] | None = None
    gpus: int = 0
    refusal: str = ""


class Executions:
    """The running executions of one emulator, and what their tasks use."""

    def __init__(
        self,
        store: RunStore,
        *,
        access: Access,
        registry: ArtifactRegistry,
        builds: CloudBuild,
        storage: CloudStorage,
        secrets: SecretManager,
        quotas: Quotas,
        logging: Logging,
        data_dir: Path,
    ) -> None:
        self.store = store
        self.state = store.state
        self.access = access
        self.registry = registry
        self.builds = builds
        self.storage = storage
        self.secrets = secrets
        self.quotas = quotas
        self.logging = logging
        self.data_dir = data_dir
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        store.fail_orphans()

    def kill_task(self, execution: str, task_index: int) -> bool:
        """SIGKILL the running attempt of a task, as a GPU host's maintenance would end it.

        `execution` is the full name or the short id. Cloud Run counts that as a failed attempt and
        retries it while retries are left. False when that task has no attempt running.
        """
        with self._lock:
            runs = [run for name, run in self._runs.items() if execution in (name, name.rsplit("/", 1)[-1])]
        return any(run.runner.kill(task_index) for run in runs)

    def shutdown(self) -> None:
        """Stop every running task; called by Emulator.stop() through RunService."""
        with self._lock:
            names = list(self._runs)
        for name in names:
            self.cancel(name)
        with self._lock:
            threads = [run.thread for run in self._runs.values() if run.thread]
        for thread in threads:
            thread.join(timeout=10)

    def start(self, execution: run_v2.Execution) -> None:
        where = match_name(EXECUTION, execution.name, "execution")
        job = match_name(JOB, where["job_name"], "job")
        context = Context(job["project"], job["location"], job["job"], where["execution"], execution.name)
        events = _Events(self, context, execution)
        runner = TaskRunner(
            count=execution.task_count,
            parallelism=execution.parallelism,
            max_retries=execution.template.max_retries,
            timeout_s=duration_seconds(execution.template.timeout),
            launch=events.process.launch,
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

    def _take_gpus(self, run: _Run, execution: run_v2.Execution, context: Context) -> None:
        """Count the execution's GPUs against the project's quota in the region, or mark it refused.

        Each task holds one GPU while it runs, so an execution needs as many as run at once. Cloud Run's
        wording when GPU quota runs out: "Quota exceeded for total allowable count of GPUs per project per
        region." (the revision condition message; GPU quota is per project and region, see quotas.py).
        """
        template = execution.template
        if not uses_gpu(template):
            return
        accelerator = template.node_selector.accelerator
        zonal = not template.gpu_zonal_redundancy_disabled
        run.gpu_key = (context.project, context.location, accelerator, zonal)
        in_use = sum(other.gpus for other in self._runs.values() if other.gpu_key == run.gpu_key)
        wanted = in_use + execution.parallelism
        allowed = self.quotas.gpu_limit(context.project, context.location, accelerator, zonal)
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
            self.store.update_execution(context.name, mark_started)
            try:
                events.process.prepare()
            except RunFailure as failure:
                events.system(str(failure), "ERROR")
                self._finish(events, failure=str(failure))
                return
            run.runner.run()
            self._finish(events, failure=events.first_failure)
        finally:
            events.process.stop_metadata()
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
        snapshot = run_v2.Execution() if stored is None else load(run_v2.Execution, stored)
        failed_count = snapshot.failed_count or snapshot.task_count - snapshot.succeeded_count
        if self._was_cancelled(context.name):
            status = Status.EXECUTION_CANCELLED
            completed = condition(
                "Completed",
                Condition.State.CONDITION_FAILED,
                "The execution was cancelled.",
                execution_reason=Condition.ExecutionReason.CANCELLED,
            )
            events.system(f"Execution {context.execution} was cancelled.", "WARNING")
        elif failure:
            status = Status.EXECUTION_FAILED
            completed = condition(
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
            seconds = (utc_now() - snapshot.start_time).total_seconds() if "start_time" in snapshot else 0.0
            completed = condition(
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
            execution = self.store.update_execution(context.name, complete)
            job_name = context.name.rsplit("/executions/", 1)[0]
            stored_job = tables["run_jobs"].get(job_name)
            if stored_job is not None:
                job = load(run_v2.Job, stored_job)
                if job.latest_created_execution.name == context.name:
                    job.latest_created_execution.completion_time = execution.completion_time
                    job.latest_created_execution.completion_status = status
                    tables["run_jobs"][job_name] = dump(job)
            operation = tables["run_execution_operations"].pop(context.name, None)
            if operation in tables["operations"]:
                tables["operations"][operation] = finished_operation(operation, execution)

    def _was_cancelled(self, name: str) -> bool:
        with self._lock:
            run = self._runs.get(name)
        return bool(run and run.cancel_requested)

    def cancel(self, name: str) -> bool:
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                return False
            run.cancel_requested = True
        run.runner.cancel()
        return True

    def log(self, context: Context, stream: str, text: str, severity: str, labels: dict[str, str]) -> None:
        self.logging.append(
            f"projects/{context.project}/logs/run.googleapis.com%2F{stream.replace('/', '%2F')}",
            "cloud_run_job",
            {"job_name": context.job, "location": context.location, "project_id": context.project},
            text,
            labels={"run.googleapis.com/execution_name": context.execution, **labels},
            severity=severity,
        )


class _Events:
    """TaskRunner's events for one execution: resources, counters and log lines."""

    def __init__(self, service: Executions, context: Context, execution: run_v2.Execution) -> None:
        self.service = service
        self.context = context
        self.execution = execution
        self.first_failure = ""
        self.process = TaskProcess(
            context,
            execution,
            self.system,
            access=service.access,
            registry=service.registry,
            builds=service.builds,
            storage=service.storage,
            secrets=service.secrets,
            data_dir=service.data_dir,
        )

    def system(self, text: str, severity: str, **labels: str) -> None:
        self.service.log(self.context, "varlog/system", text, severity, labels)

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
            task.start_time = task.start_time if "start_time" in task else utc_now()
            task.conditions = [condition("Completed", Condition.State.CONDITION_RECONCILING)]

        self.service.store.update_task(self._task_name(index), start)

        def running(execution: run_v2.Execution) -> None:
            execution.running_count += 1

        self.service.store.update_execution(self.context.name, running)

    def attempt_ended(self, index: int, attempt: int, outcome: Outcome, will_retry: bool) -> None:
        labels = self._labels(index, attempt)
        if outcome.error:
            self.system(f"Container failed to start: {outcome.error}", "ERROR", **labels)
        elif outcome.timed_out:
            self.system(
                f"Terminating task because it has reached the maximum timeout of "
                f"{duration_seconds(self.execution.template.timeout):g} seconds.",
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
        for bucket in self.context.buckets:
            self.service.storage.import_tree(bucket)

        def ended(task: run_v2.Task) -> None:
            task.retried = attempt + (1 if will_retry else 0)
            task.last_attempt_result = run_v2.TaskAttemptResult(
                exit_code=outcome.exit_code,
                term_signal=outcome.term_signal,
                status={"code": 0 if outcome.succeeded else 2, "message": _attempt_message(outcome)},
            )

        self.service.store.update_task(self._task_name(index), ended)

        def counted(execution: run_v2.Execution) -> None:
            execution.running_count = max(0, execution.running_count - 1)
            execution.retried_count += 1 if will_retry else 0

        self.service.store.update_execution(self.context.name, counted)

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
            task.completion_time = utc_now()
            task.reconciling = False
            task.conditions = [
                condition("Completed", condition_state, "" if state == "succeeded" else message)
            ]

        self.service.store.update_task(name, done)

        def counted(execution: run_v2.Execution) -> None:
            if state == "succeeded":
                execution.succeeded_count += 1
            elif state == "failed":
                execution.failed_count += 1
            else:
                execution.cancelled_count += 1

        self.service.store.update_execution(self.context.name, counted)


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
