"""`gemma-launch emulator start`: the local stand-in for Google Cloud, in the foreground."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from launcher.commands.options import Command
from launcher.errors import UserError
from launcher.settings_rules import REGION


def propagation_option(flag: str, help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A delay Google Cloud puts between a change and its effect, in seconds (2 s here; minutes there)."""
    return click.option(flag, type=click.FloatRange(min=0), default=2.0, show_default=True, help=help)


@click.group()
def emulator() -> None:
    """A local stand-in for the Google Cloud APIs gemma-launch uses, for rehearsals and tests."""


@emulator.command("start", cls=Command)
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
    "--log-read-quota",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="ListLogEntries calls a project may make per --log-read-window, as Cloud Logging's read quota "
    "(more are refused with RESOURCE_EXHAUSTED).",
)
@click.option(
    "--log-read-window",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds over which --log-read-quota counts (Google's: a minute); shorter to rehearse the quota.",
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
@propagation_option(
    "--iam-propagation", "Seconds a new service account stays unknown to IAM policies, as in Google Cloud."
)
@propagation_option(
    "--api-propagation", "Seconds a just-enabled API still answers SERVICE_DISABLED, as in Google Cloud."
)
@propagation_option(
    "--grant-propagation",
    "Seconds a role just granted is not yet in effect, as in Google Cloud (minutes there).",
)
def emulator_start(
    port: int,
    storage_port: int,
    data_dir: Path | None,
    faults: str | None,
    record: Path | None,
    build_regions: str | None,
    gpu_quota: int,
    log_read_quota: int,
    log_read_window: float,
    user: str,
    billing: bool,
    iam_propagation: float,
    api_propagation: float,
    grant_propagation: float,
) -> None:
    """Run the local cloud in the foreground until Ctrl-C.

    The first two lines are shell exports; `eval` them (or copy them) in the shell where you run
    gemma-launch, and every command talks to the emulator instead of Google Cloud.

    It starts as a new Google Cloud project is: only Google's default APIs enabled (`gemma-launch up`
    enables the rest), no Cloud Run GPU quota (--gpu-quota grants it), builds only in global and a few
    regions, Cloud Logging's read quota of 60 ListLogEntries calls a minute, and every call checked
    against IAM (docs/reliability.md, "Google's rules").
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
        "log_read_quota": log_read_quota,
        "log_read_window_s": log_read_window,
        "user": user,
        "billing": billing,
        "iam_propagation_s": iam_propagation,
        "api_propagation_s": api_propagation,
        "grant_propagation_s": grant_propagation,
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
