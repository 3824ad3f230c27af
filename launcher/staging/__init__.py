"""Model weights and the dataset into the bucket, where the job reads them through its GCS mount.

`stage` is the one entry point: it resolves both sources (sources.py), then stages each where its bytes
flow best. Hub repos go through the staging job in the region when the project has an image
(in_cloud.py starts it, worker.py is its program); local directories, and Hub repos before any image
exists, stream through this machine (bucket.py over transfer.py). Either way the completion marker is
checked first, so a complete copy costs a listing and starts nothing. Each source is reported as a
`launcher.changes.Change`; progress goes out as events (events.py), which view.py renders.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launcher.changes import Change
from launcher.cloud import Clients
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.staging.bucket import (
    MARKER,
    Outcome,
    check_trainer_sizes,
    lookup_bucket,
    read_marker,
    sizes_to_set,
    stage_source,
)
from launcher.staging.events import Note, OnEvent, ignore
from launcher.staging.in_cloud import stage_in_cloud
from launcher.staging.sources import (
    SOURCES,
    Source,
    check_named_sources,
    choose_sources,
    dataset_prefix,
    is_local,
    model_prefix,
    record_sources,
    resolve_source,
)
from launcher.staging.transfer import WORKERS

__all__ = [
    "MARKER",
    "SOURCES",
    "STAGE_IN",
    "check_named_sources",
    "check_trainer_sizes",
    "choose_sources",
    "dataset_prefix",
    "document",
    "model_prefix",
    "read_marker",
    "resolve_source",
    "sizes_to_set",
    "stage",
    "stage_source",
]

STAGE_IN = ("auto", "local", "cloud")


def stage(
    clients: Clients,
    settings: Settings,
    *,
    model_source: str | None = None,
    dataset_source: str | None = None,
    revision: str | None = None,
    stage_in: str = "auto",
    image: str | None = None,
    dry_run: bool = False,
    workers: int = WORKERS,
    on_event: OnEvent = ignore,
    on_job: Callable[[Change], None] | None = None,
    verbose: bool = False,
    check_account: bool = True,
) -> list[Change]:
    """Stage the model and the dataset into settings.bucket; safe to run again, resumes after a failure.

    `stage_in`: "local" streams every file through this machine; "cloud" runs the staging job in the
    region with `image` (the project's image) for Hub sources; "auto" is cloud for Hub sources when there
    is an image, local otherwise (a job cannot read this machine's directories). `on_job` hears how the
    staging job was created or updated, when one is needed. `on_event` hears the progress (from worker
    threads too). `verbose`: the staging job logs a line per file. `check_account`: refuse a staging job
    whose account was disabled or deleted (off for `up`, which checks or makes the account itself).

    One Change per source, model first: its name is the staged copy's gs:// prefix, its command what
    copies it (none when unchanged), its detail what `stage` shows (`document`).
    """
    if stage_in not in STAGE_IN:
        raise UserError(f"Unknown --stage-in {stage_in!r}.", f"Use one of {', '.join(STAGE_IN)}.")
    token = settings.hf_token.get_secret_value() if settings.hf_token is not None else None
    model = model_source or settings.model_id
    dataset = dataset_source or settings.dataset_id
    if revision and is_local(model):
        raise UserError(
            f"--revision {revision} was given, but the model source {model} is a local directory.",
            "Drop --revision, or pass a Hugging Face model id as --model-source.",
        )
    wanted = [("model", model, revision), ("dataset", dataset, None)]
    places = [_place(kind, source, stage_in, image) for kind, source, _ in wanted]
    if stage_in == "auto" and image is None and not all(is_local(source) for _, source, _ in wanted):
        on_event(
            Note(
                "No image of this project yet, so Hub files stream through this machine "
                "(once `gemma-launch up` has built one, they are staged by a job in the region)."
            )
        )
    sources = [resolve_source(kind, source, rev, token) for kind, source, rev in wanted]
    bucket = lookup_bucket(clients.storage, settings.bucket, dry_run)
    in_cloud = [source for source, place in zip(sources, places, strict=True) if place == "cloud"]
    done: dict[str, tuple[Outcome, str]] = {}
    if in_cloud:
        assert image is not None
        done = stage_in_cloud(
            clients, settings, bucket, in_cloud, image, dry_run, on_event, on_job, verbose, check_account
        )
    changes = []
    for source in sources:
        if source.kind in done:
            outcome, job_command = done[source.kind]
            changes.append(_change(source, settings.bucket, outcome, "cloud", job_command))
        else:
            outcome = stage_source(
                clients.storage, bucket, source, dry_run=dry_run, workers=workers, on_event=on_event
            )
            changes.append(_change(source, settings.bucket, outcome, "local"))
    if not dry_run:
        assert bucket is not None
        record_sources(clients.storage, bucket, settings, sources, revision)
    return changes


def _place(kind: str, source: str, stage_in: str, image: str | None) -> str:
    """Where `source`'s bytes flow from: "local" (this machine) or "cloud" (the staging job)."""
    if is_local(source):
        if stage_in == "cloud":
            raise UserError(
                f"--stage-in cloud cannot stage the {kind} directory {source}: a Cloud Run job cannot "
                "read this machine's files.",
                "Use --stage-in auto (the default) or local for a local directory, or pass a Hugging Face "
                "id.",
            )
        return "local"
    if stage_in == "local":
        return "local"
    if image is None:
        if stage_in == "cloud":
            raise UserError(
                "--stage-in cloud runs the staging job with the project's image, and none is built yet.",
                "Run `gemma-launch up`: it builds the image, then stages in the cloud. Or use "
                "--stage-in local.",
            )
        return "local"
    return "cloud"


def _change(source: Source, bucket: str, outcome: Outcome, where: str, job_command: str = "") -> Change:
    unchanged = outcome.status == "unchanged"
    detail = {
        "source": source.source,
        "prefix": source.prefix,
        "files": len(source.items),
        "bytes": source.bytes,
        "staged_in": where,  # "local" | "cloud": where the bytes flow (or would)
        "job_command": job_command,  # the staging job's `gcloud run jobs execute`, when it ran (or would)
        "revision": source.revision,  # the Hub commit staged; None for a local directory
    }
    command = "" if unchanged else job_command or _copy_command(source, bucket)
    return Change(
        source.kind, f"gs://{bucket}/{source.prefix}/", outcome.status, command, outcome.diff, detail
    )


def _copy_command(source: Source, bucket: str) -> str:
    """What copies `source` from this machine: `gcloud storage rsync` of the directory, after
    `hf download` for a Hub repo."""
    destination = f"gs://{bucket}/{source.prefix}"
    if is_local(source.source):
        return shlex.join(["gcloud", "storage", "rsync", "--recursive", source.source, destination])
    here = f"./{Path(source.prefix).name}"
    download = ["hf", "download", source.source, "--local-dir", here]
    download += ["--repo-type", "dataset"] if source.kind == "dataset" else []
    download += ["--revision", source.revision] if source.revision else []
    return (
        shlex.join(download)
        + " && "
        + shlex.join(["gcloud", "storage", "rsync", "--recursive", here, destination])
    )


def document(change: Change) -> dict[str, Any]:
    """A staged source as `stage --json` shows it."""
    detail = change.detail
    return {
        "kind": change.kind,
        "source": detail["source"],
        "prefix": detail["prefix"],
        "status": change.status,
        "files": detail["files"],
        "bytes": detail["bytes"],
        "staged_in": detail["staged_in"],
        "command": detail["job_command"],
        "revision": detail["revision"],
        "diff": list(change.diff),
    }
