"""The launcher's end of the staging job (`<job>-stage`): Hub sources staged in the region.

Hub repos are best staged in the region by the staging job (job.stage_job_spec: CPU only, the project's
image running launcher.staging.worker, the token from the secret). `worker_args` here and
`worker.parse` there are the two ends of its argv: each Hub source pinned to the commit resolved on this
machine. The worker calls the same `hub_source` and `stage_source` as local staging; the launcher
follows its logs and checks the marker afterwards. The marker is checked here first, so a complete copy
costs a listing and starts nothing.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable

from google.cloud import storage

from launcher import executions, logs
from launcher import job as jobs
from launcher.changes import Change
from launcher.cloud import Clients
from launcher.cloud_errors import storage_errors
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.staging.bucket import Outcome, read_plan
from launcher.staging.events import JobLine, Note, OnEvent
from launcher.staging.sources import Source


def worker_args(settings: Settings, sources: list[Source], verbose: bool = False) -> list[str]:
    """The staging job's arguments for these Hub sources, each pinned to the commit resolved here."""
    args = ["--project", settings.project_id, "--bucket", settings.bucket]
    args += ["--verbose"] if verbose else []
    for source in sources:
        assert source.revision is not None
        args += ["--kind", source.kind, "--source", source.origin, "--revision", source.revision]
        args += ["--prefix", source.prefix]
    return args


def stage_in_cloud(
    clients: Clients,
    settings: Settings,
    bucket: storage.Bucket | None,
    sources: list[Source],
    image: str,
    dry_run: bool,
    on_event: OnEvent,
    on_job: Callable[[Change], None] | None,
    verbose: bool = False,
    check_account: bool = True,
) -> dict[str, tuple[Outcome, str]]:
    """Stage Hub sources with one execution of the staging job; what is already complete runs nothing.

    Returns each kind's outcome with the execution's `gcloud run jobs execute` command ("" when none ran
    for it)."""
    stage_settings = jobs.stage_settings(settings)
    results: dict[str, tuple[Outcome, str]] = {}
    pending: dict[str, str] = {}  # kind -> the status once staged
    diffs: dict[str, tuple[str, ...]] = {}
    for source in sources:
        plan = None
        if bucket is not None:
            with storage_errors(bucket.name):
                plan = read_plan(clients.storage, bucket, source)
        if plan is not None and plan.unchanged:
            results[source.kind] = (Outcome("unchanged"), "")
        else:
            pending[source.kind] = "updated" if plan is not None and plan.ours else "created"
            diffs[source.kind] = plan.diff() if plan is not None and plan.ours else ()
    if not pending:
        return results
    todo = [source for source in sources if source.kind in pending]
    args = worker_args(settings, todo, verbose)
    command = shlex.join(
        ["gcloud", "run", "jobs", "execute", stage_settings.job, f"--region={settings.region}"]
        + [f"--project={settings.project_id}", "--args=" + ",".join(args), "--wait"]
    )
    # A Hub mirror is not a secret: the job reaches the same Hub as this machine.
    env = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"]} if os.environ.get("HF_ENDPOINT") else {}
    spec = jobs.stage_job_spec(stage_settings, image, env)
    # The staging job's tasks act as the job's account: one disabled or deleted since `up` would fail the
    # execution at its start, after the job was updated, so refuse first (as `run` and `sweep` do). `up`
    # checks, or makes, the account itself before it stages (check_account=False).
    if check_account:
        jobs.require_service_account(clients, stage_settings, spec)
    change = jobs.ensure_job(
        clients, stage_settings, spec, dry_run=dry_run, describe=jobs.stage_gcloud_command, kind="staging job"
    )
    if on_job is not None:
        on_job(change)
    if dry_run:
        for source in todo:
            status = "would update" if pending[source.kind] == "updated" else "would create"
            results[source.kind] = (Outcome(status, diffs[source.kind]), command)
        return results
    _run_staging_job(clients, stage_settings, args, todo, on_event)
    assert bucket is not None
    for source in todo:
        with storage_errors(bucket.name):
            plan = read_plan(clients.storage, bucket, source)
        if not plan.unchanged:
            raise UserError(
                f"The staging job ended well, but gs://{bucket.name}/{source.prefix}/ is not completely "
                "staged (its completion marker is missing or does not match the objects).",
                "Run again. If it persists, the job's image may be older than this launcher: run "
                "`gemma-launch up` to build the current one.",
            )
        results[source.kind] = (Outcome(pending[source.kind], diffs[source.kind]), command)
    return results


def _run_staging_job(
    clients: Clients, stage_settings: Settings, args: list[str], sources: list[Source], on_event: OnEvent
) -> None:
    execution = executions.run(clients, stage_settings, args=args, container=jobs.STAGE_CONTAINER)
    short = executions.short_name(execution.name)
    logs_command = f"gemma-launch logs {short} --job {stage_settings.job}"
    what = " and ".join(f"{source.kind} {source.source}" for source in sources)
    on_event(Note(f"Staging {what} in {stage_settings.region}: job {stage_settings.job}, execution {short}"))
    said: dict[str, str] = {}

    def emit(line: logs.Line) -> None:
        for prefix in ("Error:", "Hint:"):
            if line.text.startswith(prefix):
                said[prefix] = line.text.removeprefix(prefix).strip()
        on_event(JobLine(line))

    try:
        final = executions.follow(clients, stage_settings, execution.name, emit)
    except KeyboardInterrupt:
        on_event(
            Note(
                f"\nStopped following; the staging job goes on in the cloud. Follow it with: {logs_command} "
                "--follow"
            )
        )
        raise
    if executions.succeeded(final):
        return
    verdict = executions.state(final).lower()
    error = said.get("Error:", "")
    hint = said.get("Hint:", "")
    if any(word in error.lower() for word in ("token", "gated", "refused access")):
        hint += (
            f" The job reads HF_TOKEN from the secret {stage_settings.secret_id}: `gemma-launch up` with "
            "the right HF_TOKEN exported updates it."
        )
    raise UserError(
        f"Staging execution {short} of job {stage_settings.job} {verdict}" + (f": {error}" if error else "."),
        f"{hint} Its logs: `{logs_command}`. Run again once fixed: what was staged is kept.".strip(),
    )
