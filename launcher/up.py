"""`up`: provision, build, stage and create the job, safe to run again; every step reports `Change`s.

Nothing is created while a check fails: the sources named are read, the GPU is checked against the
model, and doctor's checks of what `up` cannot fix itself are made before the first request that
changes anything. Progress goes out through `Events`, which the CLI renders; this module prints nothing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.cloud import run_v2

from launcher import build, cost, doctor, gpus, image_source, provision, quota, staging
from launcher import job as jobs
from launcher.changes import Change
from launcher.cloud import Clients
from launcher.settings import Settings
from launcher.staging.events import Event


class Events:
    """What `up` tells as it goes. Each is a no-op here; the CLI's subclass renders them."""

    def change(self, change: Change) -> None:
        """A step's change, as soon as it is made (or planned, in a dry run)."""

    def note(self, text: str) -> None:
        """A remark on the GPU and the model: one that runs slowly, was not measured, or was defaulted."""

    def sources(self, text: str) -> None:
        """The sources recorded in the bucket by an earlier `up`, which stand in for those not named."""

    def provisioning(self) -> AbstractContextManager[object]:
        """Held while the APIs, accounts, bucket, repository and secret are provisioned."""
        return nullcontext()

    def building(self) -> AbstractContextManager[object]:
        """Held while the image is built; `build_steps` and `build_line` come within it."""
        return nullcontext()

    def build_steps(self, ids: list[str]) -> None:
        """The build started with these steps."""

    def build_line(self, text: str) -> None:
        """A line of the build's log."""

    def staging(self, event: Event) -> None:
        """Staging's progress (from its worker threads too)."""


@dataclass(frozen=True)
class Outcome:
    changes: list[Change]  # in the order they were made
    spec: run_v2.Job | None  # the job as `up` wants it; None when no job could be planned
    gpu_quota: quota.GpuQuota | None  # None when the APIs are still off or it could not be read
    quota_unknown: str = ""  # why the quota could not be read
    apis_pending: bool = False  # a dry run stopped at the APIs: nothing behind them could be read
    estimate: cost.Estimate | None = None  # a dry run's estimate of what `run` would cost
    # Sizes `run` must set, the staged dataset being smaller than the trainer's defaults: the command
    # `up` suggests last must start.
    run_sizes: dict[str, int] = field(default_factory=dict)


def up(
    settings: Settings,
    *,
    dry_run: bool = False,
    model_source: str | None = None,
    dataset_source: str | None = None,
    revision: str | None = None,
    source_dir: Path | None = None,
    skip_stage: bool = False,
    skip_build: bool = False,
    stage_in: str = "auto",
    verbose: bool = False,
    events: Events | None = None,
) -> Outcome:
    events = events or Events()
    # The directories named here are read now: a wrong one must stop `up` before anything is created.
    staging.check_named_sources(model_source, dataset_source)
    # Whether the GPU can run the image and the model named, before any request: nothing is created for
    # a job that cannot run.
    quantization = str(settings.trainer.get("quantization", "auto"))
    checked = model_source or settings.model_id
    fit = gpus.check(settings.gpu, checked, quantization)
    clients = Clients(settings.project_id)
    changes: list[Change] = []

    def report(change: Change) -> None:
        changes.append(change)
        events.change(change)

    # doctor's checks of what `up` cannot fix itself, before any change; those that need the APIs on
    # are made again once provisioning has enabled them.
    recheck = doctor.check_before_up(clients, settings)
    # The model staged last, recorded in the bucket, may stand in for model_id: checked too (a read).
    sources = staging.choose_sources(clients.storage, settings, model_source, dataset_source, revision)
    if sources.model != checked:
        fit = gpus.check(settings.gpu, sources.model, quantization)
    if fit:
        events.note(fit)
    if settings.model_defaulted and "model" not in sources.recorded and not model_source:
        why = gpus.why_default(settings.gpu)
        if why:
            events.note(why)
    with events.provisioning():
        provisioned = provision.provision(
            clients, settings, dry_run=dry_run, on_change=report, after_apis=recheck
        )
    if provision.apis_pending(provisioned):
        return Outcome(changes, None, None, apis_pending=True)

    if skip_build:
        image_uri = jobs.current_image(clients, settings)
    else:
        with events.building(), image_source.located(source_dir) as root:
            built = build.build_image(
                clients,
                settings,
                root,
                on_line=events.build_line,
                on_steps=events.build_steps,
                dry_run=dry_run,
            )
        report(built.change)
        image_uri = built.uri

    if sources.recorded:
        events.sources(sources.describe(settings.bucket))
    if skip_stage:
        model_prefix, dataset_prefix = (
            staging.model_prefix(sources.model),
            staging.dataset_prefix(sources.dataset),
        )
    else:
        sources.check_here(settings.bucket)
        staged = staging.stage(
            clients,
            settings,
            model_source=sources.model,
            dataset_source=sources.dataset,
            revision=sources.revision,
            stage_in=stage_in,
            # With --skip-build the job's image, else the last one built, can still stage.
            image=image_uri or (jobs.latest_image(clients, settings) if stage_in != "local" else None),
            dry_run=dry_run,
            on_event=events.staging,
            on_job=report,
            verbose=verbose,
            check_account=False,  # checked (or made) above
        )
        for item in staged:
            # One staging execution covers every Hub source: list its command once.
            if any(change.command == item.command for change in changes):
                item = replace(item, command="")
            report(item)
        model_prefix = next(item.detail["prefix"] for item in staged if item.kind == "model")
        dataset_prefix = next(item.detail["prefix"] for item in staged if item.kind == "dataset")

    spec = None
    if image_uri is None:
        report(Change("job", settings.job_name, "skipped"))
    else:
        args = jobs.trainer_args(settings, model_prefix, dataset_prefix)
        # Sizes set for every run must fit the dataset now staged; the trainer's defaults are checked by
        # `run`, which can override them.
        staging.check_trainer_sizes(clients, settings, args, only=list(settings.trainer))
        spec = jobs.job_spec(settings, image_uri, args)
        report(jobs.ensure_job(clients, settings, spec, dry_run=dry_run))
    estimate = cost.for_job(clients, settings, spec, args) if dry_run and spec is not None else None
    run_sizes = staging.sizes_to_set(clients, settings, args) if spec is not None and not dry_run else {}
    # Read only: a pending quota request must not hold back provisioning, the build or staging.
    try:
        return Outcome(changes, spec, quota.read(clients, settings), estimate=estimate, run_sizes=run_sizes)
    except quota.QuotaUnknown as error:
        return Outcome(changes, spec, None, str(error), estimate=estimate, run_sizes=run_sizes)
