"""`gemma-launch up`: launcher/up.py does the work; this renders its changes as they come, then a
summary."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import click

from launcher import job as jobs
from launcher import progress
from launcher import up as workflow
from launcher.changes import Change
from launcher.commands.options import Command, settings_options, source_options
from launcher.commands.render import console, err_console, print_change, say_fit
from launcher.settings import Settings
from launcher.staging.view import StagingView


@click.command("up", cls=Command)
@settings_options
@click.option(
    "--dry-run", is_flag=True, help="Show the plan and the equivalent gcloud commands; change nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@source_options
@click.option(
    "--source",
    "source_dir",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    show_default="gemma-launch's own: its checkout, or the copy an installed gemma-launch carries",
    help="Directory with the Dockerfile to build.",
)
@click.option("--skip-stage", is_flag=True, help="Do not stage model weights and data into the bucket.")
@click.option("--skip-build", is_flag=True, help="Do not build the image; the job keeps its current image.")
@click.option("--verbose", "-v", is_flag=True, help="Show the whole build log and a line per file staged.")
def up(
    settings: Settings,
    dry_run: bool,
    as_json: bool,
    model_source: str | None,
    dataset_source: str | None,
    revision: str | None,
    source_dir: Path | None,
    skip_stage: bool,
    skip_build: bool,
    stage_in: str,
    verbose: bool,
) -> None:
    """Provision, build, stage and create the job; safe to run again.

    \b
    First, with no request, whether the GPU can run the image and the model fits its memory (a model
    recorded in the bucket is checked once read); then doctor's checks of what `up` cannot fix itself
    (credentials, project, billing, permissions, GPU region, bucket name): nothing is created while one
    fails. Then, in order, each step saying created, enabled, updated or unchanged:
      0. the Google APIs it needs, enabled through Service Usage (a new project has them off)
      1. the job's and the build's service accounts; bucket (uniform access, in the job's region);
         storage.objectUser for the job's account and storage.objectViewer for the build's on that
         bucket only; Artifact Registry Docker repository, writable by the build's account only;
         logging.logWriter for the build's account (project-wide: it has no narrower scope); the
         HF_TOKEN secret (a new version only when the token changed); secretAccessor on it only
      2. the image, built by Cloud Build as the build's account, in --build-location (default
         global; skipped when this source was already built)
      3. model weights and dataset into gs://BUCKET/<model-id>/ and gs://BUCKET/datasets/<name>/:
         Hub repos by a short CPU job (<job>-stage) running that image in the region, local
         directories from this machine; nothing moves when the staged copy is complete. Later runs
         keep the sources staged last (recorded in the bucket) until others are named
      4. the Cloud Run GPU job, created or updated (untouched when its spec is unchanged)
    The GPU quota is read and shown; without it `up` warns and `run` refuses.
    """
    outcome = workflow.up(
        settings,
        dry_run=dry_run,
        model_source=model_source,
        dataset_source=dataset_source,
        revision=revision,
        source_dir=source_dir,
        skip_stage=skip_stage,
        skip_build=skip_build,
        stage_in=stage_in,
        verbose=verbose,
        events=_UpView(as_json, verbose),
    )
    _summarise_up(outcome, as_json, dry_run)
    if outcome.apis_pending and not as_json:
        console.print(
            "The rest of the plan needs these APIs on: nothing behind them can be read yet. "
            "`gemma-launch up` enables them first; `gemma-launch up --dry-run` after that shows the rest."
        )


class _UpView(workflow.Events):
    """`up`'s progress: each change as a line, a spinner while provisioning, the build's steps; with
    --json only the notes and staging's progress, on stderr (stdout is the JSON's)."""

    def __init__(self, as_json: bool, verbose: bool) -> None:
        self._json = as_json
        out = err_console if as_json else console
        self._build = progress.BuildView(out, verbose=verbose)
        self.staging = StagingView(out, verbose=verbose)

    def change(self, change: Change) -> None:
        if self._json:
            return
        print_change(change.kind, change.name, change.status, change.diff)
        if change.kind == "job" and change.status == "skipped":
            console.print(
                "  (no image built yet: run `gemma-launch up` without --skip-build to create the job)"
            )

    def note(self, text: str) -> None:
        say_fit(text)

    def sources(self, text: str) -> None:
        if not self._json:
            console.print(text, style="dim", soft_wrap=True)

    def provisioning(self) -> AbstractContextManager[object]:
        return nullcontext() if self._json else console.status("Provisioning…", spinner="dots")

    @contextmanager
    def building(self) -> Iterator[None]:
        try:
            yield
        finally:
            self._build.stop()

    def build_steps(self, ids: list[str]) -> None:
        if not self._json:
            self._build.steps(ids)

    def build_line(self, text: str) -> None:
        if not self._json:
            self._build.line(text)


def _summarise_up(outcome: workflow.Outcome, as_json: bool, dry_run: bool) -> None:
    report, spec, gpu_quota = outcome.changes, outcome.spec, outcome.gpu_quota
    if as_json:
        found = None if gpu_quota is None else dataclasses.asdict(gpu_quota)
        document = {
            "dry_run": dry_run,
            "changes": [change.document() for change in report],
            "gpu_quota": found,
        }
        if outcome.estimate is not None:
            document["estimate"] = outcome.estimate.document()
        click.echo(json.dumps(document, indent=2))
        return
    if gpu_quota is not None:
        console.print(f"GPU quota: {gpu_quota.describe()}", soft_wrap=True)
    if gpu_quota is not None and gpu_quota.gpus < 1:
        err_console.print(
            f"[yellow]Warning:[/] no Cloud Run GPU quota yet ({gpu_quota.describe()}): `gemma-launch run` is "
            f"refused until it is granted. Request it at {gpu_quota.request_url}",
            soft_wrap=True,
        )
    elif outcome.quota_unknown:
        err_console.print(f"[yellow]Warning:[/] GPU quota {outcome.quota_unknown}", soft_wrap=True)
    if dry_run:
        console.print("\nDry run: nothing was changed.")
        if outcome.estimate is not None:
            console.print(
                f"Estimated cost of `gemma-launch run`: {outcome.estimate.describe()}", soft_wrap=True
            )
        if spec is not None:
            console.print("Job spec:")
            click.echo(json.dumps(jobs.spec_dict(spec), indent=2))
        commands = [change.command for change in report if change.command]
        if commands:
            console.print("Equivalent commands:")
            for command in commands:
                click.echo(f"  {command}")
    elif all(change.status in ("unchanged", "skipped") for change in report):
        console.print("\nEverything was already in place: nothing changed.")
    elif spec is not None:
        sizes = outcome.run_sizes.items()
        sets = "".join(f" --set {key}={size}" for key, size in sizes)
        console.print(
            f"\nReady. Start a fine-tuning run with: gemma-launch run{sets} --follow", soft_wrap=True
        )
        if sizes:
            toml = " and ".join(f"{key} = {size}" for key, size in sizes)
            console.print(
                f"(the staged dataset is smaller than the trainer's default sizes; {toml} in [trainer] of "
                "gemma-launch.toml sets them for every run)",
                markup=False,
                soft_wrap=True,
            )
