"""gemma-launch: fine-tune Gemma 3 on Cloud Run GPU jobs. Thin commands: parse, call, render."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click
from google.api_core import exceptions
from google.cloud import run_v2
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from launcher import (
    build,
    cost,
    doctor,
    gpus,
    image_source,
    logs,
    overrides,
    pricing,
    progress,
    provision,
    quota,
    staging,
)
from launcher import down as teardown
from launcher import job as jobs
from launcher import results as run_results
from launcher.api_errors import translate
from launcher.changes import Change
from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.settings import (
    CONFIG_FILE,
    REGION,
    Settings,
    check_run_timeout,
    load_settings,
    parse_duration,
    template,
)
from launcher.transfer import human_bytes

# Rich assumes 80 columns when output is not a terminal; logs and CI captures read better unwrapped.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

_STATUS_STYLE = {
    "created": "green",
    "enabled": "green",
    "would enable": "cyan",
    "updated": "yellow",
    "unchanged": "dim",
    "would create": "cyan",
    "would update": "cyan",
    "skipped": "dim",
    "deleted": "red",
    "cancelled": "red",
    "would delete": "cyan",
    "would cancel": "cyan",
    "absent": "dim",
    "kept": "dim",
}


_SETTINGS_KEY = "gemma_launch.settings"


class SettingOption(click.Option):
    """A flag that sets one of the settings, which gemma-launch.toml and the environment can set too."""


class Command(click.Command):
    """Help lists the command's own options first, then the settings it reads, in a section of their own."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own, settings = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                (settings if isinstance(param, SettingOption) else own).append(record)
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        if settings:
            with formatter.section("Settings (defaults < gemma-launch.toml < environment variables < flags)"):
                formatter.write_dl(settings)


class Cli(click.Group):
    """Turns a UserError, or any Google API error no step explained, into `Error:` / `Hint:` lines and
    exit status 2, with no traceback."""

    command_class = Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, exceptions.GoogleAPICallError, exceptions.RetryError) as caught:
            error = (
                caught if isinstance(caught, UserError) else translate(caught, ctx.meta.get(_SETTINGS_KEY))
            )
            # Escaped: messages quote what the user wrote, such as "[trainer]", which is not markup.
            err_console.print(f"[bold red]Error:[/] {escape(error.message)}", soft_wrap=True)
            if error.hint:
                err_console.print(f"[bold]Hint:[/] {escape(error.hint)}", soft_wrap=True)
            ctx.exit(2)


# (flag, settings field, click type); each flag's help is the field's description in the Settings model.
_SETTING_FLAGS: tuple[tuple[str, str, Any], ...] = (
    ("--project", "project_id", str),
    ("--region", "region", str),
    ("--build-location", "build_location", str),
    ("--service-account", "service_account", str),
    ("--build-service-account", "build_service_account", str),
    ("--bucket", "bucket", str),
    ("--repository", "repository", str),
    ("--secret-id", "secret_id", str),
    ("--image", "image", str),
    ("--job", "job", str),
    ("--gpu", "gpu", click.Choice(["nvidia-rtx-pro-6000", "nvidia-l4", "none"])),
    ("--cpu", "cpu", str),
    ("--memory", "memory", str),
    ("--task-timeout", "task_timeout", str),
    ("--max-retries", "max_retries", int),
    ("--network", "network", str),
    ("--subnet", "subnet", str),
    ("--vpc-egress", "vpc_egress", click.Choice(["all-traffic", "private-ranges-only"])),
    ("--model-id", "model_id", str),
)


# The settings a command that only reads an execution of the job needs to find it.
JOB_SETTINGS = ("project_id", "region", "job")
# Staging reads and writes the bucket, with the project's image as the staging job <job>-stage.
STAGE_SETTINGS = (
    "project_id",
    "region",
    "service_account",
    "bucket",
    "repository",
    "secret_id",
    "image",
    "job",
    "model_id",
)


def settings_options(
    command: Callable[..., Any] | None = None,
    *,
    gpu_region: bool = True,
    fields: tuple[str, ...] | None = None,
) -> Any:
    """Add --config and a flag per setting the command reads; the command receives a validated
    `settings` (the other settings still come from gemma-launch.toml, the environment and defaults).

    `fields`: the settings flags to offer (default: all); `gpu_region=False`: a GPU not offered in the
    region is left to the command. The flags come after the command's own in its help (Command)."""
    if command is None:
        return functools.partial(settings_options, gpu_region=gpu_region, fields=fields)
    offered = [entry for entry in _SETTING_FLAGS if fields is None or entry[1] in fields]
    zonal = fields is None or "gpu_zonal_redundancy" in fields

    @functools.wraps(command)
    def wrapper(*args: Any, config: Path | None, **kwargs: Any) -> Any:
        flags = {field: kwargs.pop(field) for _, field, _ in offered}
        names = {field: flag for flag, field, _ in offered}
        if zonal:
            flags["gpu_zonal_redundancy"] = kwargs.pop("zonal_redundancy")
            names["gpu_zonal_redundancy"] = "--zonal-redundancy"
        settings = load_settings(config, flags, gpu_region=gpu_region, flag_names=names)
        click.get_current_context().meta[_SETTINGS_KEY] = settings
        return command(*args, settings=settings, **kwargs)

    options = [
        click.option(
            "--config",
            cls=SettingOption,
            type=click.Path(path_type=Path, dir_okay=False),
            help=f"Settings file (default: ./{CONFIG_FILE} when present).",
        )
    ]
    options += [
        click.option(flag, field, cls=SettingOption, type=kind, help=Settings.model_fields[field].description)
        for flag, field, kind in offered
    ]
    if zonal:
        options.append(
            click.option(
                "--zonal-redundancy/--no-zonal-redundancy",
                cls=SettingOption,
                default=None,
                help=Settings.model_fields["gpu_zonal_redundancy"].description,
            )
        )
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def source_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The staging flags `up` and `stage` share."""
    for option in reversed(
        (
            click.option(
                "--model-source",
                help="Hugging Face model id or local model directory to stage (default: the one staged "
                "last, recorded in the bucket, else model_id).",
            ),
            click.option(
                "--dataset-source",
                help="Hugging Face dataset id or local directory in the Oxford-IIIT Pet layout "
                "(default: the one staged last, else dataset_id).",
            ),
            click.option(
                "--revision",
                help="Hub revision (branch, tag or commit) of the model; default main, or the one staged "
                "last.",
            ),
            click.option(
                "--stage-in",
                type=click.Choice(staging.STAGE_IN),
                default="auto",
                show_default=True,
                help="Where staged bytes flow: auto = Hub sources by a CPU Cloud Run job in the region when "
                "the project's image exists, local directories from this machine; local = all from this "
                "machine; cloud = the job.",
            ),
        )
    ):
        command = option(command)
    return command


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gemma-launch")
def main() -> None:
    """Fine-tune Gemma 3 on Cloud Run Jobs GPUs (RTX PRO 6000 or L4).

    \b
    Typical session:
      export PROJECT_ID=my-project
      read -rs HF_TOKEN && export HF_TOKEN   # paste a Hugging Face read token
      gemma-launch init          # optional: write gemma-launch.toml
      gemma-launch up            # provision, build the image, stage weights, create the job
      gemma-launch run --follow  # fine-tune, streaming the logs

    Settings come from defaults < gemma-launch.toml < environment variables (PROJECT_ID, REGION,
    BUCKET_NAME, ...) < flags. Rehearse everything locally with `gemma-launch emulator start`.
    """


@main.command()
@click.option(
    "--path", type=click.Path(path_type=Path, dir_okay=False), default=Path(CONFIG_FILE), show_default=True
)
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init(path: Path, force: bool) -> None:
    """Write a commented gemma-launch.toml with every setting and its default."""
    if path.exists() and not force:
        raise UserError(
            f"{path} already exists.", "Edit it, or pass --force to overwrite it with the defaults."
        )
    path.write_text(template())
    console.print(
        f"Wrote {path}: uncomment project_id and set it to your project (or export PROJECT_ID), then run "
        "`gemma-launch up`."
    )


def _print_change(kind: str, name: str, status: str, diff: tuple[str, ...] | list[str] = ()) -> None:
    style = _STATUS_STYLE.get(status, "default")
    console.print(f"[{style}]{status:>12}[/]  {kind:<16} {escape(name)}", soft_wrap=True)
    for line in diff:
        console.print(f"{'':>14}{line}", style=style, markup=False, soft_wrap=True)


@main.command()
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
         storage.objectAdmin for the job's account and storage.objectViewer for the build's on that
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
    # The directories named here are read now: a wrong one must stop `up` before anything is created.
    staging.check_named_sources(model_source, dataset_source)
    # Whether the GPU can run the image and the model named, before any request: nothing is created for
    # a job that cannot run.
    quantization = str(settings.trainer.get("quantization", "auto"))
    checked = model_source or settings.model_id
    fit = gpus.check(settings.gpu, checked, quantization)
    clients = Clients(settings.project_id)
    report: list[dict[str, Any]] = []

    def record(kind: str, name: str, status: str, command: str = "", diff: tuple[str, ...] = ()) -> None:
        report.append({"kind": kind, "name": name, "status": status, "command": command, "diff": list(diff)})
        if not as_json:
            _print_change(kind, name, status, diff)

    def on_change(change: Change) -> None:
        record(change.kind, change.name, change.status, change.command, change.diff)

    # doctor's checks of what `up` cannot fix itself, before any change; those that need the APIs on
    # are made again once provisioning has enabled them.
    recheck = doctor.check_before_up(clients, settings)
    # The model staged last, recorded in the bucket, may stand in for model_id: checked too (a read).
    sources = staging.choose_sources(clients.storage, settings, model_source, dataset_source, revision)
    if sources.model != checked:
        fit = gpus.check(settings.gpu, sources.model, quantization)
    _say_fit(fit)
    if settings.model_defaulted and "model" not in sources.recorded and not model_source:
        _say_fit(gpus.why_default(settings.gpu))
    with console.status("Provisioning…", spinner="dots") if not as_json else nullcontext():
        changes = provision.provision(
            clients, settings, dry_run=dry_run, on_change=on_change, after_apis=recheck
        )
    if provision.apis_pending(changes):
        _summarise_up(report, as_json, dry_run, None, None, "")
        if not as_json:
            console.print(
                "The rest of the plan needs these APIs on: nothing behind them can be read yet. "
                "`gemma-launch up` enables them first; `gemma-launch up --dry-run` after that shows the rest."
            )
        return

    spec, estimate = None, None
    if skip_build:
        image_uri = jobs.current_image(clients, settings)
    else:
        view = progress.BuildView(err_console if as_json else console, verbose=verbose)
        try:
            with image_source.located(source_dir) as root:
                built = build.build_image(
                    clients,
                    settings,
                    root,
                    on_line=(lambda line: None) if as_json else view.line,
                    on_steps=None if as_json else view.steps,
                    dry_run=dry_run,
                )
        finally:
            view.stop()
        record("image", built.uri, built.status, built.command if built.status != "unchanged" else "")
        image_uri = built.uri

    if sources.recorded and not as_json:
        console.print(sources.describe(settings.bucket), style="dim", soft_wrap=True)
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
            console=err_console if as_json else console,
            on_job=lambda change: record(
                "staging job",
                change.name,
                change.status,
                "" if change.status == "unchanged" else change.command,
                change.diff,
            ),
            verbose=verbose,
        )
        for item in staged:
            command = "" if item.status == "unchanged" else staging.equivalent_command(item, settings.bucket)
            # One staging execution covers every Hub source: list its command once.
            command = "" if any(entry["command"] == command for entry in report) else command
            record(item.kind, f"gs://{settings.bucket}/{item.prefix}/", item.status, command, item.diff)
        model_prefix = next(item.prefix for item in staged if item.kind == "model")
        dataset_prefix = next(item.prefix for item in staged if item.kind == "dataset")

    if image_uri is None:
        record("job", settings.job_name, "skipped", "")
        if not as_json:
            console.print(
                "  (no image built yet: run `gemma-launch up` without --skip-build to create the job)"
            )
    else:
        args = jobs.trainer_args(settings, model_prefix, dataset_prefix)
        # Sizes set for every run must fit the dataset now staged; the trainer's defaults are checked by
        # `run`, which can override them.
        staging.check_trainer_sizes(clients, settings, args, only=list(settings.trainer))
        spec = jobs.job_spec(settings, image_uri, args)
        if dry_run:
            estimate = _estimate(clients, settings, spec, args)
        change = jobs.ensure_job(clients, settings, spec, dry_run=dry_run)
        record(
            "job",
            change.name,
            change.status,
            change.command if change.status != "unchanged" else "",
            change.diff,
        )
    # Read only: a pending quota request must not hold back provisioning, the build or staging.
    try:
        gpu_quota, unknown = quota.read(clients, settings), ""
    except quota.QuotaUnknown as error:
        gpu_quota, unknown = None, str(error)
    _summarise_up(report, as_json, dry_run, spec, gpu_quota, unknown, estimate)


def _say_fit(line: str | None) -> None:
    if line:
        err_console.print(f"[yellow]Note:[/] {line}", soft_wrap=True)


def _summarise_up(
    report: list[dict[str, Any]],
    as_json: bool,
    dry_run: bool,
    spec: run_v2.Job | None,
    gpu_quota: quota.GpuQuota | None,
    unknown: str,
    estimate: cost.Estimate | None = None,
) -> None:
    if as_json:
        found = None if gpu_quota is None else dataclasses.asdict(gpu_quota)
        document = {"dry_run": dry_run, "changes": report, "gpu_quota": found}
        if estimate is not None:
            document["estimate"] = estimate.document()
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
    elif unknown:
        err_console.print(f"[yellow]Warning:[/] GPU quota {unknown}", soft_wrap=True)
    if dry_run:
        console.print("\nDry run: nothing was changed.")
        if estimate is not None:
            console.print(f"Estimated cost of `gemma-launch run`: {estimate.describe()}", soft_wrap=True)
        if spec is not None:
            console.print("Job spec:")
            click.echo(json.dumps(jobs.spec_dict(spec), indent=2))
        commands = [entry["command"] for entry in report if entry["command"]]
        if commands:
            console.print("Equivalent commands:")
            for command in commands:
                click.echo(f"  {command}")
    elif all(entry["status"] in ("unchanged", "skipped") for entry in report):
        console.print("\nEverything was already in place: nothing changed.")
    elif spec is not None:
        console.print("\nReady. Start a fine-tuning run with: gemma-launch run --follow")


@main.command("doctor")
@settings_options(gpu_region=False)
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor_command(settings: Settings, as_json: bool) -> None:
    """Check, changing nothing, what `up` and `run` need; exit 0 only when every check passes.

    \b
    One line per check, ✓ or ✗ with its fix:
      credentials and their account; the project and its billing; the APIs gemma-launch calls; the
      permissions `up` uses; the GPU type in the region; the GPU quota; the build location; the bucket
      name (free, or already this project's).
    On a new project some checks need APIs that are still off: they fail as "cannot check until" the
    API is enabled, which `gemma-launch up` does first.
    """
    checks = doctor.run_checks(Clients(settings.project_id), settings)
    failed = [check for check in checks if not check.passed]
    if as_json:
        document = {"ok": not failed, "checks": [dataclasses.asdict(check) for check in checks]}
        click.echo(json.dumps(document, indent=2))
    else:
        for check in checks:
            mark = "[green]✓[/]" if check.passed else "[red]✗[/]"
            fix = f"  Fix: {escape(check.fix)}" if check.fix and not check.passed else ""
            console.print(
                f"{mark} [bold]{doctor.TITLES[check.name]:<15}[/] {escape(check.detail)}{fix}", soft_wrap=True
            )
    if failed:
        raise UserError(
            f"{len(failed)} of {len(checks)} checks failed: "
            f"{', '.join(doctor.TITLES[check.name] for check in failed)}.",
            "Apply the fix named on each ✗ line, then run `gemma-launch doctor` again.",
        )


@main.command("run")
@settings_options(fields=(*JOB_SETTINGS, "gpu", "gpu_zonal_redundancy", "task_timeout"))
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a trainer flag for this run (repeatable), checked against the trainer's own flags. "
    f"Keys: {', '.join(overrides.settable())}.",
)
@click.option("--train-size", type=click.IntRange(min=1), help="Shortcut for --set train-size=N.")
@click.option("--tasks", type=click.IntRange(min=1), help="Number of tasks for this execution.")
@click.option(
    "--timeout",
    help="Task timeout for this execution, e.g. 2h or 45m. With a GPU at most 12h, and over 1h only when "
    "the job's own task_timeout is over 1h (Cloud Run's Preview of long running GPU jobs).",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Stream the logs until the execution ends; exit 0 only if it succeeded.",
)
@click.option(
    "--allow-concurrent",
    is_flag=True,
    help="Start even while another execution of the job runs (each holds its own GPU).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the execution as JSON (as `status --json` shows one); with --follow once it has ended, "
    "the log going to stderr.",
)
@click.option(
    "--verbose", "-v", is_flag=True, help="With --follow: every log line, no progress bar of the steps."
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Start nothing when the estimated cost is above this many US dollars.",
)
def run_command(
    settings: Settings,
    sets: tuple[str, ...],
    train_size: int | None,
    tasks: int | None,
    timeout: str | None,
    follow: bool,
    allow_concurrent: bool,
    as_json: bool,
    verbose: bool,
    max_cost: float | None,
) -> None:
    """Execute the job once, optionally overriding trainer flags, and print the execution's name.

    Nothing starts when the job's GPU cannot run the image or its model (with the --set given) does not
    fit the GPU's memory, while another execution of the job is running (stop it with `gemma-launch
    cancel`, or pass --allow-concurrent), nor when the project's Cloud Run GPU quota in the job's region
    cannot give the execution its GPU: the error names the quota to request and where.

    With --follow, the log streams until the execution ends; the trainer's step lines show as a
    progress bar with the time left (on a terminal) or a line at each quarter of the steps.
    """
    changes = overrides.parse_sets(sets)
    if train_size is not None:
        changes["train-size"] = str(train_size)
    timeout_s = None
    if timeout:
        try:
            timeout_s = parse_duration(timeout)
        except ValueError as error:
            raise UserError(f"Invalid --timeout: {error}.", "Use a duration like 2h, 45m or 3600s.") from None
        check_run_timeout(settings, timeout_s)
    clients = Clients(settings.project_id)
    _say_fit(jobs.check_fits(clients, settings, changes))
    # Before anything starts: an execution whose sizes exceed the staged splits would fail in the trainer.
    args = overrides.apply(jobs.current_args(clients, settings), changes)
    staging.check_trainer_sizes(clients, settings, args)
    if not allow_concurrent:
        jobs.refuse_concurrent(clients, settings)
    try:
        quota.require_for_run(clients, settings, jobs.gpus_held(clients, settings))
    except quota.QuotaUnknown as unknown:
        err_console.print(f"[yellow]Warning:[/] {unknown}; starting anyway.", soft_wrap=True)
    estimate = _estimate(
        clients, settings, clients.jobs.get_job(name=settings.job_name, retry=RETRY), args, tasks
    )
    (err_console if as_json else console).print(f"Estimated cost: {estimate.describe()}", soft_wrap=True)
    cost.check_max_cost(estimate, max_cost)
    execution = jobs.run(clients, settings, sets=changes, tasks=tasks, timeout_s=timeout_s)
    short = jobs.short_name(execution.name)
    if follow:
        (err_console if as_json else console).print(f"Started execution {short}")
        final = _follow(clients, settings, execution.name, verbose=verbose, quiet=as_json)
        if as_json:
            click.echo(json.dumps(_execution_document(final), indent=2))
        _fail_unless_succeeded(clients, settings, final)
    elif as_json:
        click.echo(json.dumps(_execution_document(execution), indent=2))
    else:
        console.print(f"Started execution {short}")
        console.print(f"Follow it with: gemma-launch logs {short} --follow")


def _estimate(
    clients: Clients, settings: Settings, job: run_v2.Job, args: list[str], tasks: int | None = None
) -> cost.Estimate:
    gpu, model = job.template.template.node_selector.accelerator, _arg(args, "--model-id")
    rates = cost.history_rates(clients, settings, gpu, model, cost.built_in_rates(gpu, model))
    return cost.estimate(job, args, pricing.prices(clients, settings.region, gpu), rates, tasks)


def _actual_cost(
    clients: Clients, settings: Settings, execution: run_v2.Execution, known: dict[str, pricing.Prices]
) -> float | None:
    """What a finished execution cost, in USD; None while it runs. `known`: prices already read, by GPU."""
    gpu = execution.template.node_selector.accelerator
    if gpu not in known:
        known[gpu] = pricing.prices(clients, settings.region, gpu)
    spent = cost.actual_usd(clients, execution, known[gpu])
    return None if spent is None else round(spent, 4)


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else ""


def _execution_document(execution: run_v2.Execution) -> dict[str, Any]:
    """An execution for --json: its row of `status --json`, its full name and the job's."""
    return {**jobs.summary(execution), "name": execution.name, "job": execution.job}


def _follow(
    clients: Clients, settings: Settings, execution: str, *, verbose: bool = False, quiet: bool = False
) -> run_v2.Execution:
    """Stream the log until the execution ends and say how it ended; returns it as it ended.

    `quiet`: everything to stderr (stdout is kept for JSON)."""
    out = err_console if quiet else console
    view = progress.TrainingView(out, lambda line: click.echo(line.render(), err=quiet), verbose=verbose)
    try:
        logs.stream(clients, settings, execution, follow=True, emit=view)
    except KeyboardInterrupt:
        view.stop()
        err_console.print(
            "\nStopped following; the execution goes on. Resume with: "
            f"gemma-launch logs {jobs.short_name(execution)} --follow; stop it with: "
            f"gemma-launch cancel {jobs.short_name(execution)}"
        )
        raise SystemExit(130) from None
    view.stop()
    final = jobs.get_execution(clients, settings, execution)
    out.print(
        f"Execution {jobs.short_name(execution)} {jobs.state(final).lower()}: "
        f"{final.succeeded_count}/{final.task_count} tasks succeeded, {final.retried_count} retried."
        + (f" {jobs.why(final)}" if jobs.why(final) else ""),
        markup=False,
        soft_wrap=True,
    )
    return final


def _fail_unless_succeeded(clients: Clients, settings: Settings, final: run_v2.Execution) -> None:
    """Exit 2 with the trainer's Error/Hint when it recorded an error a retry cannot fix, else 1."""
    if jobs.state(final) == "Succeeded":
        return
    stopped = run_results.recorded_failure(clients, settings, final.name)
    if stopped is not None:
        raise UserError(
            f"Execution {jobs.short_name(final.name)} stopped on an error a retry cannot fix: "
            f"{stopped.message}",
            stopped.hint,
        )
    raise SystemExit(1)


def _emit(line: logs.Line) -> None:
    click.echo(line.render())


def _emit_json(line: logs.Line) -> None:
    click.echo(json.dumps(line.document()))


@main.command("logs")
@settings_options(fields=JOB_SETTINGS)
@click.argument("execution", required=False)
@click.option(
    "--follow", "-f", is_flag=True, help="Keep streaming until the execution ends; exit 1 if it failed."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='One JSON object per line: {"timestamp": RFC 3339 or null, "task": index or null, "text": ...}; '
    "with --follow, every line and nothing else on stdout.",
)
@click.option(
    "--verbose", "-v", is_flag=True, help="With --follow: every log line, no progress bar of the steps."
)
def logs_command(
    settings: Settings, execution: str | None, follow: bool, as_json: bool, verbose: bool
) -> None:
    """Show an execution's logs (default: the newest), with the task index on each line.

    With --follow, the trainer's step lines show as a progress bar with the time left (on a terminal)
    or a line at each quarter of the steps; --verbose shows them all."""
    clients = Clients(settings.project_id)
    name = jobs.execution_name(clients, settings, execution)
    if as_json:
        logs.stream(clients, settings, name, follow=follow, emit=_emit_json)
        if follow and not jobs.succeeded(jobs.get_execution(clients, settings, name)):
            raise SystemExit(1)
    elif follow:
        _fail_unless_succeeded(clients, settings, _follow(clients, settings, name, verbose=verbose))
    else:
        logs.stream(clients, settings, name, follow=False, emit=_emit)


@main.command()
@settings_options(fields=JOB_SETTINGS)
@click.option(
    "--limit", type=click.IntRange(min=1), default=10, show_default=True, help="How many executions."
)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(settings: Settings, limit: int, as_json: bool) -> None:
    """The job's executions, newest first: state, tasks, retries, start, duration, and why one failed."""
    clients, known = Clients(settings.project_id), {}
    summaries = [
        {**jobs.summary(found), "cost_usd": _actual_cost(clients, settings, found, known)}
        for found in jobs.list_executions(clients, settings, limit)
    ]
    if as_json:
        click.echo(json.dumps(summaries, indent=2))
        return
    if not summaries:
        console.print(f"Job {settings.job} has no executions yet. Start one with `gemma-launch run`.")
        return
    table = Table(title=f"{settings.job} ({settings.region})")
    for column in ("execution", "state", "succeeded", "failed", "retried", "started", "duration", "cost"):
        table.add_column(column)
    for row in summaries:
        table.add_row(
            row["execution"],
            row["state"],
            f"{row['succeeded']}/{row['tasks']}",
            str(row["failed"]),
            str(row["retried"]),
            row["started"] or "-",
            row["duration"] or "-",
            f"${row['cost_usd']:.2f}" if row["cost_usd"] is not None else "-",
        )
    console.print(table)
    for row in summaries:
        if row["why"]:
            console.print(f"{row['execution']} {row['state'].lower()}: {row['why']}", soft_wrap=True)


@main.command()
@settings_options(fields=(*JOB_SETTINGS, "bucket"))
@click.argument("execution", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print results.json, with an added outputs list: where each output is and whether it exists.",
)
def results(settings: Settings, execution: str | None, as_json: bool) -> None:
    """Baseline vs fine-tuned accuracy, macro-F1 and unknown rate of an execution (default: newest),
    and where its adapter, merged model, results.json and confusion matrix are."""
    clients = Clients(settings.project_id)
    name = jobs.execution_name(clients, settings, execution)
    found = run_results.load(clients, settings, name)
    if found is None:
        raise run_results.no_results(clients, settings, name)
    places = run_results.outputs(clients, settings, name)
    spent = _actual_cost(clients, settings, jobs.get_execution(clients, settings, name), {})
    if as_json:
        outputs = [dataclasses.asdict(out) for out in places]
        click.echo(json.dumps({**found, "outputs": outputs, "cost_usd": spent}, indent=2))
        return
    table = Table(title=f"Execution {jobs.short_name(name)}")
    for column in ("metric", "baseline", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, before, after, change in run_results.rows(found):
        # A difference of two percentages is in percentage points: +62.2 pp, not +62.2 %.
        table.add_row(label, f"{before:.1%}", f"{after:.1%}", f"{change * 100:+.1f} pp")
    console.print(table)
    console.print(
        f"model {found.get('model_id')}; eval method {found.get('eval_method')}, {found.get('eval_size')} "
        f"test images, {found.get('train_size')} training images",
        soft_wrap=True,
    )
    if spent is not None:
        console.print(f"cost ≈ ${spent:.2f} (its tasks' run time at Cloud Run's prices)", soft_wrap=True)
    for out in places:
        if out.present:
            console.print(f"{out.label:<17} {out.url}  ({out.note})", markup=False, soft_wrap=True)
            console.print(f"{'':<17} {out.console}", markup=False, soft_wrap=True)
        else:
            console.print(f"{out.label:<17} {out.note}", markup=False, soft_wrap=True)


@main.command()
@settings_options(fields=JOB_SETTINGS)
@click.argument("execution", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def cancel(settings: Settings, execution: str | None, as_json: bool) -> None:
    """Stop an execution (default: the newest running one); safe to run again.

    Its tasks are stopped and it ends as Cancelled; what it wrote to the bucket stays. Cancelling one
    that already finished changes nothing and says how it ended.
    """
    clients = Clients(settings.project_id)
    if execution:
        name = jobs.execution_name(clients, settings, execution)
    else:
        unfinished = jobs.running(clients, settings)
        if not unfinished:
            if as_json:
                click.echo(json.dumps({"execution": None, "status": "unchanged", "state": None}, indent=2))
            else:
                console.print(f"No execution of job {settings.job} is running: nothing to cancel.")
            return
        name = unfinished[0].name
    outcome = jobs.cancel(clients, settings, name)
    short, verdict = jobs.short_name(name), jobs.state(outcome.execution)
    if as_json:
        click.echo(json.dumps({"execution": short, "status": outcome.status, "state": verdict}, indent=2))
    elif outcome.status == "cancelled":
        console.print(f"Cancelled execution {short}.")
    elif outcome.status == "cancelling":
        console.print(
            f"Asked execution {short} to stop; it is still stopping. `gemma-launch status` shows when it has."
        )
    else:
        console.print(f"Execution {short} had already finished ({verdict.lower()}): nothing to cancel.")


# What `down` reads and deletes: everything `up` made, found by the same names.
DOWN_SETTINGS = (
    "project_id",
    "region",
    "service_account",
    "build_service_account",
    "bucket",
    "repository",
    "secret_id",
    "job",
)


@main.command()
@settings_options(gpu_region=False, fields=DOWN_SETTINGS)
@click.option(
    "--delete-bucket",
    is_flag=True,
    help="Delete the bucket too, with the weights, data and results in it (asks you to type its name).",
)
@click.option("--yes", is_flag=True, help="With --delete-bucket: do not ask for the bucket's name.")
@click.option("--force", is_flag=True, help="Cancel a running execution first instead of refusing.")
@click.option(
    "--dry-run", is_flag=True, help="Show what would be deleted and the gcloud commands; delete nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def down(
    settings: Settings, delete_bucket: bool, yes: bool, force: bool, dry_run: bool, as_json: bool
) -> None:
    """Remove what `up` made; safe to run again.

    \b
    One line per resource, deleted, absent or kept: the job and the staging job with their
    executions, every binding `up` granted, the repository with its images, the HF_TOKEN secret with
    its versions, and the two service accounts. The bucket (weights, data, results) is kept unless
    --delete-bucket. Nothing is deleted while an execution runs, unless --force, which cancels it.
    """
    if delete_bucket and not (yes or dry_run):
        typed = click.prompt(
            f"This deletes gs://{settings.bucket} and everything in it. Type the bucket name to confirm",
            default="",
            show_default=False,
            err=True,
        )
        if typed.strip() != settings.bucket:
            raise UserError(
                f"The name typed does not match bucket {settings.bucket}: nothing was deleted.",
                "Type the bucket name exactly, or pass --yes; leave out --delete-bucket to keep it.",
            )
    report: list[Change] = []

    def on_change(change: Change) -> None:
        report.append(change)
        if not as_json:
            _print_change(change.kind, change.name, change.status, change.diff)

    teardown.down(
        Clients(settings.project_id),
        settings,
        delete_bucket_too=delete_bucket,
        force=force,
        dry_run=dry_run,
        on_change=on_change,
    )
    if as_json:
        document = {"dry_run": dry_run, "changes": [dataclasses.asdict(change) for change in report]}
        click.echo(json.dumps(document, indent=2))
    elif dry_run:
        commands = [change.command for change in report if change.command]
        console.print("\nDry run: nothing was deleted." + (" Equivalent commands:" if commands else ""))
        for command in commands:
            click.echo(f"  {command}")
    elif all(change.status in ("absent", "kept") for change in report):
        console.print("\nNothing left to delete.")


@main.group()
def emulator() -> None:
    """A local stand-in for the Google Cloud APIs gemma-launch uses, for rehearsals and tests."""


@emulator.command("start")
@click.option("--port", type=int, default=0, show_default=True, help="gRPC port (0: a free one).")
@click.option("--storage-port", type=int, default=0, show_default=True, help="Storage port (0: a free one).")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Keep state here across restarts (default: a new temporary directory).",
)
@click.option(
    "--faults",
    metavar="SPEC",
    # Spaces after the commas let the help wrap between pairs instead of inside one.
    help="Inject errors: comma-separated STATUS=RATE pairs (a gRPC status name), lost=RATE (the call is "
    "carried out, its reply lost) and seed=N, e.g. 'UNAVAILABLE=0.3, DEADLINE_EXCEEDED=0.05, lost=0.1, "
    "seed=7'.",
)
@click.option(
    "--record",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Append every request as JSON lines here.",
)
@click.option(
    "--build-regions",
    metavar="REGION,...|all",
    help="Regions where Cloud Build accepts builds besides global (default: the six that Cloud Build's "
    "locations page lists for restricted projects, as a new project gets; all: every region).",
)
@click.option(
    "--gpu-quota",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Cloud Run GPUs the project may use at once, in every region and for every GPU type (0: a fresh "
    "project, whose GPU executions fail until quota is granted).",
)
@click.option(
    "--user",
    default="developer@example.com",
    show_default=True,
    help="The account gemma-launch calls as: owner of every project it names.",
)
@click.option(
    "--billing/--no-billing",
    default=True,
    show_default=True,
    help="Whether the projects have billing enabled (what `doctor` checks).",
)
@click.option(
    "--iam-propagation",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds a new service account stays unknown to IAM policies, as in Google Cloud.",
)
def emulator_start(
    port: int,
    storage_port: int,
    data_dir: Path | None,
    faults: str | None,
    record: Path | None,
    build_regions: str | None,
    gpu_quota: int,
    user: str,
    billing: bool,
    iam_propagation: float,
) -> None:
    """Run the local cloud in the foreground until Ctrl-C.

    The first two lines are shell exports; `eval` them (or copy them) in the shell where you run
    gemma-launch, and every command talks to the emulator instead of Google Cloud.

    It starts as a new Google Cloud project is: only Google's default APIs enabled (`gemma-launch up`
    enables the rest), no Cloud Run GPU quota (--gpu-quota grants it), builds only in global and a few
    regions, and every call checked against IAM (docs/reliability.md, "Google's rules").
    """
    from launcher.emulator.faults import Faults
    from launcher.emulator.server import Emulator

    try:
        Faults.parse(faults)
    except ValueError as error:
        raise UserError(
            f"Invalid --faults: {error}.", "Example: --faults 'UNAVAILABLE=0.3,lost=0.1,seed=7'."
        ) from None
    options: dict[str, Any] = {
        "gpu_quota": gpu_quota,
        "user": user,
        "billing": billing,
        "iam_propagation_s": iam_propagation,
    }
    if build_regions is not None:
        options["build_regions"] = _build_regions(build_regions)
    Emulator(
        port=port, storage_port=storage_port, data_dir=data_dir, faults=faults, record=record, **options
    ).serve()


def _build_regions(text: str) -> list[str] | None:
    if text.strip() == "all":
        return None
    regions = [region.strip() for region in text.split(",") if region.strip()]
    wrong = [region for region in regions if not REGION.match(region)]
    if wrong or not regions:
        raise UserError(
            f"Invalid --build-regions {text!r}: {', '.join(wrong) or 'no region'} is not a region name.",
            "List regions like us-central1,europe-west1, or pass all.",
        )
    return regions


@main.command()
@settings_options(fields=STAGE_SETTINGS)
@source_options
@click.option(
    "--dry-run",
    is_flag=True,
    help="Show the plan (what would be transferred, where) and the equivalent commands; change nothing.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option("--verbose", "-v", is_flag=True, help="A line per file staged.")
def stage(
    settings: Settings,
    model_source: str | None,
    dataset_source: str | None,
    revision: str | None,
    stage_in: str,
    dry_run: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Copy the model weights and the dataset into the bucket (`up` does this too); safe to run again.

    Hub files stream straight into the bucket (no local copy), several at once, each verified against
    the Hub's sha256 and the bucket's crc32c; what is already there intact is skipped, and an
    interrupted run picks up where it stopped. With the project's image built (by `up`), Hub repos are
    staged by a short CPU job in the region, <job>-stage, whose progress is shown here.
    """
    from dataclasses import asdict

    staging.check_named_sources(model_source, dataset_source)
    clients = Clients(settings.project_id)
    out = err_console if as_json else console
    jobs_changed: list[jobs.JobChange] = []

    def on_job(change: jobs.JobChange) -> None:
        jobs_changed.append(change)
        if not as_json and not dry_run:  # a dry run's plan is shown whole, at the end
            _print_change("staging job", change.name, change.status, change.diff)

    sources = staging.choose_sources(clients.storage, settings, model_source, dataset_source, revision)
    if sources.recorded:
        out.print(sources.describe(settings.bucket), style="dim", soft_wrap=True)
    sources.check_here(settings.bucket)
    image = None
    if stage_in != "local":
        image = jobs.current_image(clients, settings) or jobs.latest_image(clients, settings)
    staged = staging.stage(
        clients,
        settings,
        model_source=sources.model,
        dataset_source=sources.dataset,
        revision=sources.revision,
        stage_in=stage_in,
        image=image,
        dry_run=dry_run,
        console=out,
        on_job=on_job,
        verbose=verbose,
    )
    commands = [change.command for change in jobs_changed if change.status != "unchanged"]
    for item in staged:
        command = staging.equivalent_command(item, settings.bucket) if item.status != "unchanged" else ""
        if command and command not in commands:
            commands.append(command)
    if as_json:
        document = {"dry_run": dry_run, "staged": [asdict(item) for item in staged]}
        click.echo(json.dumps({**document, "commands": commands} if dry_run else document, indent=2))
        return
    if dry_run:
        console.print("Plan (dry run: nothing is transferred, created or changed):")
        for change in jobs_changed:
            _print_change("staging job", change.name, change.status, change.diff)
    for item in staged:
        where = "by the staging job" if item.staged_in == "cloud" else "from this machine"
        _print_change(
            item.kind,
            f"gs://{settings.bucket}/{item.prefix}/ ({item.files} files, {human_bytes(item.bytes)}, {where})",
            item.status,
            item.diff,
        )
    if dry_run:
        if commands:
            console.print("Equivalent commands:")
            for command in commands:
                click.echo(f"  {command}")
        console.print("\nDry run: nothing was changed.")
