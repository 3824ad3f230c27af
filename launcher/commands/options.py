"""The flags commands share: a flag per setting (settings_options), the staging sources, and the help
that lists the settings a command reads apart from its own options."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from launcher import staging
from launcher.settings import CONFIG_FILE, Settings
from launcher.settings_sources import load_settings

# Where a command's settings wait for Cli.invoke, which names them in a translated Google error.
SETTINGS_KEY = "gemma_launch.settings"


class SettingOption(click.Option):
    """A flag that sets one of the settings, which gemma-launch.toml and the environment can set too."""


class Command(click.Command):
    """Help lists the command's own options first, then the settings it reads, in a section of their own."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as caught:
            # Click's parser leaves the context off an option missing its value; the usage line and the
            # hint's `--help` need it.
            caught.ctx = caught.ctx or ctx
            raise

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        own, settings = [], []
        for param in self.get_params(ctx):
            # Since click 8.5.1 an argument has a help record too; the usage line and the command's help
            # say what it is, as click's own format_options leaves arguments out of Options.
            if isinstance(param, click.Argument):
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                (settings if isinstance(param, SettingOption) else own).append(record)
        if own:
            with formatter.section("Options"):
                formatter.write_dl(own)
        if settings:
            with formatter.section("Settings (defaults < gemma-launch.toml < environment variables < flags)"):
                formatter.write_dl(settings)


# (flag, settings field, click type); each flag's help is the field's description in the Settings model
# and its default (_setting_help).
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


def _setting_help(field: str) -> str:
    """The setting's description, and its default where the description does not say it. The flag's own
    default stays None, since gemma-launch.toml and the environment come before the built-in default:
    click cannot show that one itself."""
    info = Settings.model_fields[field]
    described = info.description or ""
    if info.is_required() or "default" in described:
        return described
    default = info.default
    if field == "bucket":
        default = "<project_id>-gemma3-finetuning"  # Settings._defaults derives it from the project
    elif isinstance(default, bool):
        default = "zonal-redundancy" if default else "no-zonal-redundancy"  # click's style for a flag pair
    if default == "":
        return described  # empty means none, as the description says
    return f"{described}  [default: {default}]"


# The settings a command that reads an execution of the job needs to find it: the job, and the bucket
# where its runs wrote (and which keeps them after `down`), as `up --bucket` may have named another.
JOB_SETTINGS = ("project_id", "region", "bucket", "job")

# The options `run`, `sweep` and `logs` share.
FOLLOW_VERBOSE = click.option(
    "--verbose", "-v", is_flag=True, help="With --follow: every log line, no progress bar of the steps."
)


# `run --train-size N` and `sweep --train-size N`: the README's tour shows the first, a newcomer tries
# the second.
TRAIN_SIZE = click.option("--train-size", type=click.IntRange(min=1), help="Shortcut for --set train-size=N.")


def with_train_size(sets: dict[str, str], train_size: int | None) -> dict[str, str]:
    """The --set pairs with --train-size's, which wins over a --set train-size."""
    return sets if train_size is None else {**sets, "train-size": str(train_size)}


def max_cost_option(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--max-cost",
        type=click.FloatRange(min=0),
        metavar="USD",
        help=f"Start nothing when the estimated cost{what} is above this many US dollars.",
    )


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
        click.get_current_context().meta[SETTINGS_KEY] = settings
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
        click.option(flag, field, cls=SettingOption, type=kind, help=_setting_help(field))
        for flag, field, kind in offered
    ]
    if zonal:
        options.append(
            click.option(
                "--zonal-redundancy/--no-zonal-redundancy",
                cls=SettingOption,
                default=None,
                help=_setting_help("gpu_zonal_redundancy"),
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
