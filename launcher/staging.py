"""Model weights and the dataset into the bucket, where the job reads them through its GCS mount.

Layout: a Hub model goes to gs://BUCKET/<model id>/ (the Cloud Run GPU tutorial's layout, so its job
arguments keep working), a local model directory to models/<dir name>/, a dataset to datasets/<name>/.

A staged prefix is complete only when its marker object (`.gemma-launch-staged.json`, listing every
file's size and hashes and the Hub revision; for a dataset also its split sizes, which `up` and `run` check
the trainer's sizes against) exists and agrees with the objects: the marker is checked
first, deleted before anything under the prefix changes, and written last. Each object carries the
Hub's hash and the crc32c verified at upload in its metadata, so a re-run skips what is intact,
re-uploads what is missing or altered, and removes files it staged that the source no longer has.

Where the bytes flow (`stage_in`): Hub repos are best staged in the region by the staging job
(job.stage_job_spec: `<job>-stage`, CPU only, the project's image running launcher.stage_worker, the
token from the secret), which calls the same `hub_source` and `stage_source` as local staging, pinned
to the commit resolved here; the launcher follows its logs and checks the marker afterwards. Local
directories, and Hub repos before any image exists, stream through this machine. Either way the marker
is checked here first, so a complete copy costs a listing and starts nothing.

What was staged last is recorded in the bucket, next to the staged copies (SOURCES: each kind's source,
the revision asked for, and the model_id / dataset_id setting it stood in for), so later commands
(`up --skip-stage`, `up --gpu ...`, `stage`) keep using those sources until the user names others: with
--model-source / --dataset-source, or by changing model_id / dataset_id (a GPU whose default model
differs changes it: `up --gpu nvidia-l4` after the 27B default stages 4B). The bucket, not this machine
nor the job, holds it because the bucket is what every machine and teammate working on the project
shares, `stage` alone changes no job, and the job's arguments give only the mount path, not the
directory or Hub revision it came from.

Storage calls use google-cloud-storage's own DEFAULT_RETRY: unlike launcher.cloud.RETRY it also retries
dropped connections, which long transfers meet.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import google_crc32c
from google.api_core import exceptions
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
from rich.console import Console

from launcher import job as jobs
from launcher import logs, overrides
from launcher.cloud import Clients
from launcher.cloud_errors import hub_errors, storage_errors
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.transfer import (
    CRC32C_KEY,
    PIECE,
    WORKERS,
    Item,
    OnBytes,
    Reporter,
    TransferError,
    crc32c_text,
    hub_pieces,
    human_bytes,
    local_pieces,
    run_parallel,
    upload,
)

STAGE_IN = ("auto", "local", "cloud")
SOURCES = ".gemma-launch/sources.json"
MARKER = ".gemma-launch-staged.json"
MARKER_FORMAT = 1
# Metadata keys that identify an object this tool staged (and may therefore replace or delete).
_DIGEST_KEYS = ("hf-sha256", "hf-etag", "sha256")
# Never worth staging from a local directory: git internals and huggingface_hub's download bookkeeping.
_SKIP_DIRS = {".git", ".cache", "__pycache__"}


@dataclass(frozen=True)
class Staged:
    kind: str  # "model" | "dataset"
    source: str  # Hub id or local dir as given
    prefix: str  # object prefix in the bucket, no gs://, no trailing slash
    status: str  # "created" | "updated" | "unchanged" | "would create" | "would update"
    files: int
    bytes: int
    staged_in: str = "local"  # "local" | "cloud": where the bytes flow (or would)
    command: str = ""  # for the cloud: the equivalent `gcloud run jobs execute` command
    revision: str | None = None  # the Hub commit staged; None for a local directory
    diff: tuple[str, ...] = ()  # what an update changes: files to upload, files to delete


@dataclass(frozen=True)
class Source:
    """What to stage: every file with its expected size and hash, resolved before anything moves."""

    kind: str
    source: str  # as given
    origin: str  # canonical: the Hub id, or the directory's absolute path
    prefix: str
    revision: str | None  # the Hub commit every file is pinned to; None for a local directory
    items: tuple[Item, ...]
    headers: dict[str, str]  # Hub request headers (holds the token: never printed)
    page: str  # where a person looks at the repo (or the directory)
    # A dataset's images per split as the trainer draws them ("train": trainval, "test"); None when the
    # source does not say (a datasets.save_to_disk directory, a Hub dataset card without split sizes).
    splits: dict[str, int] | None = None

    @property
    def bytes(self) -> int:
        return sum(item.size for item in self.items)


@dataclass(frozen=True)
class Sources:
    """The model and dataset a command works with, and which of them come from the record."""

    model: str
    dataset: str
    revision: str | None
    recorded: tuple[str, ...]  # "model", "dataset": taken from SOURCES, not named by this command

    def describe(self, bucket: str) -> str:
        """A line saying which sources were taken from the record; "" when none were."""
        if not self.recorded:
            return ""
        named = {"model": self.model, "dataset": self.dataset}
        which = ", ".join(f"{kind} {named[kind]}" for kind in self.recorded)
        flags = " / ".join(f"--{kind}-source" for kind in self.recorded)
        return f"Using the sources staged before (gs://{bucket}/{SOURCES}): {which}; {flags} names others."

    def check_here(self, bucket: str) -> None:
        """Staging again reads a recorded local directory: it must be on this machine."""
        for kind in self.recorded:
            source = self.model if kind == "model" else self.dataset
            if _is_local(source) and not Path(source).is_dir():
                prefix = (model_prefix if kind == "model" else dataset_prefix)(source)
                raise UserError(
                    f"The {kind} was last staged from the directory {source}, which is not on this machine.",
                    f"Pass --{kind}-source (a directory here, or a Hugging Face id) to stage one; the copy "
                    f"staged before stays at gs://{bucket}/{prefix}/, and `gemma-launch up --skip-stage` "
                    "uses it as it is.",
                )


def choose_sources(
    client: storage.Client,
    settings: Settings,
    model_source: str | None,
    dataset_source: str | None,
    revision: str | None,
) -> Sources:
    """What to stage or train on: the sources named now, else the ones staged last (when model_id /
    dataset_id are still the ones they stood in for), else model_id / dataset_id.

    A model source named with --model-source also stands while model_id is the GPU's default, whichever
    GPU's: `up --gpu nvidia-l4` keeps a directory staged before, but replaces the 27B Hub default with 4B.
    """
    # Both named: nothing to read (a dry run then reads no object at all).
    record = read_sources(client, settings.bucket) if not (model_source and dataset_source) else {}
    recorded = []

    def pick(kind: str, given: str | None, default: str, defaulted: bool = False) -> str:
        entry = record.get(kind) or {}
        source = entry.get("source")
        stands = entry.get("default") == default or (defaulted and source != entry.get("default"))
        if given or not source or not stands:
            return given or default
        recorded.append(kind)
        return source

    model = pick("model", model_source, settings.model_id, settings.model_defaulted)
    dataset = pick("dataset", dataset_source, settings.dataset_id)
    if "model" in recorded and revision is None:
        revision = record["model"].get("revision")
    return Sources(model, dataset, revision, tuple(recorded))


def read_sources(client: storage.Client, bucket: str) -> dict[str, Any]:
    """The SOURCES record ({} when there is none, or no bucket yet)."""
    with storage_errors(bucket):
        try:
            document = json.loads(client.bucket(bucket).blob(SOURCES).download_as_bytes(retry=DEFAULT_RETRY))
        except (exceptions.NotFound, ValueError):
            return {}
    return document if isinstance(document, dict) else {}


def _record_sources(
    client: storage.Client,
    bucket: storage.Bucket,
    settings: Settings,
    sources: list[Source],
    revision: str | None,
) -> None:
    """Write SOURCES when it changes (so an unchanged re-run writes nothing)."""
    defaults = {"model": settings.model_id, "dataset": settings.dataset_id}
    document = {
        source.kind: {
            "source": source.origin,
            "revision": revision if source.kind == "model" else None,
            "prefix": source.prefix,
            "default": defaults[source.kind],
        }
        for source in sources
    }
    if read_sources(client, bucket.name) == document:
        return
    with storage_errors(bucket.name):
        bucket.blob(SOURCES).upload_from_string(
            json.dumps(document, indent=1), content_type="application/json", retry=DEFAULT_RETRY
        )


def _is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir() or source.startswith(("/", ".", "~"))


def _local_name(source: str) -> str:
    return Path(source).expanduser().resolve().name


def model_prefix(source: str) -> str:
    """Hub id -> the id itself (the tutorial's layout); local directory -> models/<dir name>."""
    if _is_local(source):
        return f"models/{_local_name(source)}"
    return source.strip("/")


def dataset_prefix(source: str) -> str:
    """Hub id or directory -> datasets/<last path part>, e.g. datasets/oxford-iiit-pet."""
    name = _local_name(source) if _is_local(source) else source.strip("/").rsplit("/", 1)[-1]
    return f"datasets/{name}"


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
    console: Console | None = None,
    workers: int = WORKERS,
    on_bytes: OnBytes | None = None,
    on_job: Callable[[jobs.JobChange], None] | None = None,
    verbose: bool = False,
) -> list[Staged]:
    """Stage the model and the dataset into settings.bucket; safe to run again, resumes after a failure.

    `stage_in`: "local" streams every file through this machine; "cloud" runs the staging job in the
    region with `image` (the project's image) for Hub sources; "auto" is cloud for Hub sources when there
    is an image, local otherwise (a job cannot read this machine's directories). `on_job` hears how the
    staging job was created or updated, when one is needed. `on_bytes(path, count)` is called as bytes
    of a file arrive locally (from worker threads). `verbose`: a line per file, here or in the job.
    """
    if stage_in not in STAGE_IN:
        raise UserError(f"Unknown --stage-in {stage_in!r}.", f"Use one of {', '.join(STAGE_IN)}.")
    console = console or Console(stderr=True, highlight=False)
    token = settings.hf_token.get_secret_value() if settings.hf_token is not None else None
    model = model_source or settings.model_id
    dataset = dataset_source or settings.dataset_id
    if revision and _is_local(model):
        raise UserError(
            f"--revision {revision} was given, but the model source {model} is a local directory.",
            "Drop --revision, or pass a Hugging Face model id as --model-source.",
        )
    wanted = [("model", model, revision), ("dataset", dataset, None)]
    places = [_place(kind, source, stage_in, image) for kind, source, _ in wanted]
    if stage_in == "auto" and image is None and not all(_is_local(source) for _, source, _ in wanted):
        console.print(
            "No image of this project yet, so Hub files stream through this machine "
            "(once `gemma-launch up` has built one, they are staged by a job in the region).",
            soft_wrap=True,
        )
    sources = [resolve_source(kind, source, rev, token) for kind, source, rev in wanted]
    bucket = lookup_bucket(clients.storage, settings.bucket, dry_run)
    in_cloud = [source for source, place in zip(sources, places, strict=True) if place == "cloud"]
    done: dict[str, Staged] = {}
    if in_cloud:
        assert image is not None
        staged = _stage_in_cloud(
            clients, settings, bucket, in_cloud, image, dry_run, console, on_job, verbose
        )
        done = {item.kind: item for item in staged}
    staged = [
        done.get(source.kind)
        or stage_source(
            clients.storage,
            bucket,
            source,
            dry_run=dry_run,
            console=console,
            workers=workers,
            on_bytes=on_bytes,
            verbose=verbose,
        )
        for source in sources
    ]
    if not dry_run:
        assert bucket is not None
        _record_sources(clients.storage, bucket, settings, sources, revision)
    return staged


def _place(kind: str, source: str, stage_in: str, image: str | None) -> str:
    """Where `source`'s bytes flow from: "local" (this machine) or "cloud" (the staging job)."""
    if _is_local(source):
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


def lookup_bucket(client: storage.Client, name: str, dry_run: bool = False) -> storage.Bucket | None:
    """The bucket; None only in a dry run before it exists (otherwise a UserError that says run `up`)."""
    with storage_errors(name):
        bucket = client.lookup_bucket(name, retry=DEFAULT_RETRY)
    if bucket is None and not dry_run:
        raise UserError(
            f"Bucket {name} does not exist.",
            "Run `gemma-launch up`: it creates the bucket (in the job's region) and then stages into it.",
        )
    return bucket


# ---------------------------------------------------------------------------------------------- sources


def resolve_source(kind: str, source: str, revision: str | None, token: str | None) -> Source:
    """List what `source` holds: a local directory, or a Hub repo at `revision` (default: main)."""
    if _is_local(source):
        return _local_source(kind, source)
    return hub_source(kind, source, revision, token)


def check_named_sources(model_source: str | None, dataset_source: str | None) -> None:
    """What can be known of --model-source / --dataset-source on this machine, before anything is created:
    a directory exists and holds a model or the pets, anything else looks like a Hub id (owner/name)."""
    for kind, source in (("model", model_source), ("dataset", dataset_source)):
        if not source:
            continue
        if _is_local(source):
            _check_local(kind, source)
        elif "/" not in source.strip("/"):
            example = "google/gemma-3-4b-it" if kind == "model" else "timm/oxford-iiit-pet"
            raise UserError(
                f"--{kind}-source {source} is neither a directory here nor a Hugging Face {kind} id "
                "(owner/name).",
                f"Pass the path of a local {kind} directory (./{source} if it is meant to be one), or a Hub "
                f"id such as {example}.",
            )


_OFFICIAL_FILES = ("list.txt", "trainval.txt", "test.txt")


def _check_local(kind: str, source: str) -> Path:
    """The directory of a local source, refused unless the trainer can read it."""
    root = Path(source).expanduser().resolve()
    flag = f"--{kind}-source"
    if not root.is_dir():
        raise UserError(
            f"{kind.capitalize()} directory {source} does not exist.",
            f"Check the path given to {flag} (relative paths start from {Path.cwd()}).",
        )
    if kind == "model" and not (root / "config.json").is_file():
        raise UserError(
            f"{source} has no config.json, so it is not a model directory from_pretrained can load.",
            "Pass the directory that holds config.json and the weights (save_pretrained's output).",
        )
    if kind == "dataset" and (root / "annotations" / "list.txt").is_file():
        missing = [name for name in _OFFICIAL_FILES if not (root / "annotations" / name).is_file()]
        if missing or not (root / "images").is_dir():
            absent = [f"annotations/{name}" for name in missing] + (
                [] if (root / "images").is_dir() else ["images/"]
            )
            raise UserError(
                f"{source} is in the Oxford-IIIT Pet layout but lacks {', '.join(absent)}.",
                "The trainer reads annotations/list.txt, trainval.txt and test.txt and the images/ they "
                "name: copy the dataset's whole annotations/ and images/ directories.",
            )
    elif kind == "dataset" and not (root / "dataset_dict.json").is_file():
        raise UserError(
            f"{source} is neither in the Oxford-IIIT Pet layout (annotations/list.txt, images/) nor a "
            "saved dataset (dataset_dict.json).",
            "Pass the directory that holds annotations/ and images/, or a Hub dataset id.",
        )
    return root


def _official_splits(root: Path) -> dict[str, int] | None:
    """Images per split of the official layout: the rows of trainval.txt and test.txt, as the trainer
    counts them (blank lines and # comments aside)."""
    if not (root / "annotations" / "list.txt").is_file():
        return None
    counts = {}
    for split, name in (("train", "trainval.txt"), ("test", "test.txt")):
        lines = (root / "annotations" / name).read_text(errors="replace").splitlines()
        counts[split] = sum(1 for line in lines if line.strip() and not line.startswith("#"))
    return counts


def _card_splits(card: Any) -> dict[str, int] | None:
    """Split sizes from a Hub dataset card's `dataset_info` (its README's metadata, which push_to_hub
    writes), when it gives the train and test splits' num_examples."""
    data = card.to_dict() if hasattr(card, "to_dict") else card
    info = data.get("dataset_info") if isinstance(data, dict) else None
    if isinstance(info, list):  # one entry per config: the default one, else the first
        default = [
            entry for entry in info if isinstance(entry, dict) and entry.get("config_name") == "default"
        ]
        info = (default or info or [None])[0]
    if not isinstance(info, dict):
        return None
    sizes = {
        split.get("name"): split.get("num_examples")
        for split in info.get("splits") or []
        if isinstance(split, dict)
    }
    if all(isinstance(sizes.get(name), int) for name in ("train", "test")):
        return {"train": sizes["train"], "test": sizes["test"]}
    return None


def _local_source(kind: str, source: str) -> Source:
    root = _check_local(kind, source)
    prefix = (model_prefix if kind == "model" else dataset_prefix)(source)
    items = []
    for path in _walk(root):
        relative = path.relative_to(root).as_posix()
        size, sha256, crc32c = _hash_file(path)
        items.append(
            Item(relative, f"{prefix}/{relative}", size, "sha256", sha256, local=path, crc32c=crc32c)
        )
    if not items:
        raise UserError(f"{source} is empty.", "Pass a directory with files in it.")
    splits = _official_splits(root) if kind == "dataset" else None
    return Source(kind, source, str(root), prefix, None, tuple(items), {}, str(root), splits)


def _walk(root: Path) -> Iterator[Path]:
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if name not in _SKIP_DIRS)
        for name in sorted(files):
            if name != MARKER:
                yield Path(directory) / name


def _hash_file(path: Path) -> tuple[int, str, str]:
    sha256 = hashlib.sha256()
    crc32c = google_crc32c.Checksum()
    size = 0
    with path.open("rb") as source:
        while piece := source.read(PIECE):
            sha256.update(piece)
            crc32c.update(piece)
            size += len(piece)
    return size, sha256.hexdigest(), crc32c_text(crc32c)


def hub_source(
    kind: str, repo_id: str, revision: str | None, token: str | None, prefix: str | None = None
) -> Source:
    """A Hub repo at `revision` (default: main), to go under `prefix` (default: the layout's)."""
    repo_id = repo_id.strip("/")
    endpoint = constants.ENDPOINT
    page = f"{endpoint}/{repo_id}" if kind == "model" else f"{endpoint}/datasets/{repo_id}"
    api = HfApi(endpoint=endpoint, token=token or False, library_name="gemma-launch")
    headers = build_hf_headers(token=token or False, library_name="gemma-launch")
    with hub_errors(kind, repo_id, revision, page, token is not None):
        if kind == "model":
            info: Any = api.model_info(repo_id, revision=revision, files_metadata=True)
        else:
            info = api.dataset_info(repo_id, revision=revision, files_metadata=True)
        commit = info.sha
        base = f"{endpoint}/{repo_id}" if kind == "model" else f"{endpoint}/datasets/{repo_id}"
        prefix = prefix or (model_prefix(repo_id) if kind == "model" else dataset_prefix(repo_id))
        items = []
        for sibling in info.siblings or []:
            url = f"{base}/resolve/{quote(commit, safe='')}/{quote(sibling.rfilename)}"
            if sibling.lfs is not None:
                size, key, digest = sibling.lfs.size, "hf-sha256", sibling.lfs.sha256
            else:
                size, key, digest = sibling.size, "hf-etag", sibling.blob_id
            if size is None or digest is None:
                raise UserError(
                    f"The Hub listed {sibling.rfilename} of {repo_id} without its size or hash.",
                    "Run again; if it persists the Hub's API has changed: report it.",
                )
            items.append(Item(sibling.rfilename, f"{prefix}/{sibling.rfilename}", size, key, digest, url))
        if not items:
            raise UserError(f"{kind.capitalize()} {repo_id} has no files at {commit}.", f"See {page}.")
        # Licence and token problems surface on file access, not on the listing: ask once, up front.
        smallest = min(items, key=lambda item: item.size)
        response = get_session().head(smallest.url or "", headers=headers, timeout=30.0)
        hf_raise_for_status(response)
    splits = _card_splits(getattr(info, "card_data", None)) if kind == "dataset" else None
    return Source(kind, repo_id, repo_id, prefix, commit, tuple(items), headers, page, splits)


# ---------------------------------------------------------------------------------------------- staging


def stage_source(
    client: storage.Client,
    bucket: storage.Bucket | None,
    source: Source,
    *,
    dry_run: bool = False,
    console: Console | None = None,
    workers: int = WORKERS,
    on_bytes: OnBytes | None = None,
    verbose: bool = False,
) -> Staged:
    console = console or Console(stderr=True, highlight=False)

    def staged(status: str, plan: _Plan | None = None) -> Staged:
        return _staged(source, status, "local", diff=plan.diff() if plan and plan.ours else ())

    if bucket is None:  # dry run before `up` created the bucket
        return staged("would create")
    with storage_errors(bucket.name):
        plan = _plan(client, bucket, source)
        if plan.unchanged:
            return staged("unchanged")
        if dry_run:
            return staged("would update" if plan.ours else "would create", plan)
        if plan.marker is not None:
            # From here until the new marker is written, the prefix must not read as complete.
            plan.marker.delete(retry=DEFAULT_RETRY)
        if plan.missing:
            _transfer(bucket, source, plan.missing, console, workers, on_bytes, verbose)
        for blob in plan.stale:
            blob.delete(retry=DEFAULT_RETRY)
        _write_marker(client, bucket, source)
    return staged("updated" if plan.ours else "created", plan)


@dataclass(frozen=True)
class _Plan:
    """What the bucket holds under a source's prefix, compared with the source."""

    marker: storage.Blob | None
    ours: bool  # some object there was staged by this tool (so staging now updates)
    missing: list[Item]  # absent, or not intact
    stale: list[storage.Blob]  # staged by us, no longer in the source
    complete: bool  # the marker describes exactly these files and objects

    @property
    def unchanged(self) -> bool:
        return not self.missing and not self.stale and self.complete

    def diff(self) -> tuple[str, ...]:
        """What staging changes under a prefix staged before."""
        lines = []
        if self.missing:
            size = human_bytes(sum(item.size for item in self.missing))
            lines.append(f"{_files(len(self.missing))} to upload ({size}), missing or not intact")
        if self.stale:
            lines.append(f"{_files(len(self.stale))} to delete, no longer in the source")
        if not lines:
            lines.append("the completion marker to write again")
        return tuple(lines)


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _plan(client: storage.Client, bucket: storage.Bucket, source: Source) -> _Plan:
    existing = {
        blob.name: blob for blob in client.list_blobs(bucket, prefix=source.prefix + "/", retry=DEFAULT_RETRY)
    }
    marker = existing.pop(f"{source.prefix}/{MARKER}", None)
    ours = {name: blob for name, blob in existing.items() if _staged_by_us(blob)}
    wanted = {item.object_name for item in source.items}
    return _Plan(
        marker=marker,
        ours=bool(ours),
        missing=[item for item in source.items if not _intact(existing.get(item.object_name), item)],
        stale=[blob for name, blob in ours.items() if name not in wanted],
        complete=marker is not None and _marker_matches(marker, source, existing),
    )


# ---------------------------------------------------------------------------------------------- in the cloud


def worker_args(settings: Settings, sources: list[Source], verbose: bool = False) -> list[str]:
    """The staging job's arguments for these Hub sources, each pinned to the commit resolved here."""
    args = ["--project", settings.project_id, "--bucket", settings.bucket]
    args += ["--verbose"] if verbose else []
    for source in sources:
        assert source.revision is not None
        args += ["--kind", source.kind, "--source", source.origin, "--revision", source.revision]
        args += ["--prefix", source.prefix]
    return args


def _stage_in_cloud(
    clients: Clients,
    settings: Settings,
    bucket: storage.Bucket | None,
    sources: list[Source],
    image: str,
    dry_run: bool,
    console: Console,
    on_job: Callable[[jobs.JobChange], None] | None,
    verbose: bool = False,
) -> list[Staged]:
    """Stage Hub sources with one execution of the staging job; what is already complete runs nothing."""
    stage_settings = jobs.stage_settings(settings)
    results: dict[str, Staged] = {}
    pending: dict[str, str] = {}  # kind -> the status once staged
    diffs: dict[str, tuple[str, ...]] = {}
    for source in sources:
        plan = None
        if bucket is not None:
            with storage_errors(bucket.name):
                plan = _plan(clients.storage, bucket, source)
        if plan is not None and plan.unchanged:
            results[source.kind] = _staged(source, "unchanged", "cloud")
        else:
            pending[source.kind] = "updated" if plan is not None and plan.ours else "created"
            diffs[source.kind] = plan.diff() if plan is not None and plan.ours else ()
    if not pending:
        return [results[source.kind] for source in sources]
    todo = [source for source in sources if source.kind in pending]
    args = worker_args(settings, todo, verbose)
    command = shlex.join(
        ["gcloud", "run", "jobs", "execute", stage_settings.job, f"--region={settings.region}"]
        + [f"--project={settings.project_id}", "--args=" + ",".join(args), "--wait"]
    )
    # A Hub mirror is not a secret: the job reaches the same Hub as this machine.
    env = {"HF_ENDPOINT": os.environ["HF_ENDPOINT"]} if os.environ.get("HF_ENDPOINT") else {}
    spec = jobs.stage_job_spec(stage_settings, image, env)
    change = jobs.ensure_job(
        clients, stage_settings, spec, dry_run=dry_run, describe=jobs.stage_gcloud_command
    )
    if on_job is not None:
        on_job(change)
    if dry_run:
        for source in todo:
            status = "would update" if pending[source.kind] == "updated" else "would create"
            results[source.kind] = _staged(source, status, "cloud", command, diffs[source.kind])
        return [results[source.kind] for source in sources]
    _run_staging_job(clients, stage_settings, args, todo, console)
    assert bucket is not None
    for source in todo:
        with storage_errors(bucket.name):
            plan = _plan(clients.storage, bucket, source)
        if not plan.unchanged:
            raise UserError(
                f"The staging job ended well, but gs://{bucket.name}/{source.prefix}/ is not completely "
                "staged (its completion marker is missing or does not match the objects).",
                "Run again. If it persists, the job's image may be older than this launcher: run "
                "`gemma-launch up` to build the current one.",
            )
        results[source.kind] = _staged(source, pending[source.kind], "cloud", command, diffs[source.kind])
    return [results[source.kind] for source in sources]


def _run_staging_job(
    clients: Clients, stage_settings: Settings, args: list[str], sources: list[Source], console: Console
) -> None:
    execution = jobs.run(clients, stage_settings, sets={}, args=args, container=jobs.STAGE_CONTAINER)
    short = jobs.short_name(execution.name)
    logs_command = f"gemma-launch logs {short} --job {stage_settings.job}"
    what = " and ".join(f"{source.kind} {source.source}" for source in sources)
    console.print(
        f"Staging {what} in {stage_settings.region}: job {stage_settings.job}, execution {short}",
        soft_wrap=True,
    )
    said: dict[str, str] = {}

    def emit(line: logs.Line) -> None:
        for prefix in ("Error:", "Hint:"):
            if line.text.startswith(prefix):
                said[prefix] = line.text.removeprefix(prefix).strip()
        console.print(f"  {line.render()}", markup=False, highlight=False, soft_wrap=True)

    try:
        logs.stream(clients, stage_settings, execution.name, follow=True, emit=emit)
    except KeyboardInterrupt:
        console.print(
            f"\nStopped following; the staging job goes on in the cloud. Follow it with: {logs_command} "
            "--follow",
            soft_wrap=True,
        )
        raise
    final = jobs.get_execution(clients, stage_settings, execution.name)
    if jobs.succeeded(final):
        return
    verdict = jobs.state(final).lower()
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


def _staged(source: Source, status: str, where: str, command: str = "", diff: tuple[str, ...] = ()) -> Staged:
    return Staged(
        source.kind,
        source.source,
        source.prefix,
        status,
        len(source.items),
        source.bytes,
        where,
        command,
        source.revision,
        diff,
    )


def equivalent_command(item: Staged, bucket: str) -> str:
    """The commands that copy what `item` stages: the staging job's execution for the cloud; for this
    machine, `gcloud storage rsync` of the directory, after `hf download` for a Hub repo."""
    if item.command:
        return item.command
    destination = f"gs://{bucket}/{item.prefix}"
    if _is_local(item.source):
        return shlex.join(["gcloud", "storage", "rsync", "--recursive", item.source, destination])
    here = f"./{Path(item.prefix).name}"
    download = ["hf", "download", item.source, "--local-dir", here]
    download += ["--repo-type", "dataset"] if item.kind == "dataset" else []
    download += ["--revision", item.revision] if item.revision else []
    return (
        shlex.join(download)
        + " && "
        + shlex.join(["gcloud", "storage", "rsync", "--recursive", here, destination])
    )


def _staged_by_us(blob: storage.Blob) -> bool:
    metadata = blob.metadata or {}
    return any(key in metadata for key in _DIGEST_KEYS)


def _intact(blob: storage.Blob | None, item: Item) -> bool:
    """Same size, same source hash, and the crc32c verified at upload is still the object's crc32c."""
    if blob is None:
        return False
    metadata = blob.metadata or {}
    return (
        blob.size == item.size
        and metadata.get(item.digest_key) == item.digest
        and blob.crc32c is not None
        and metadata.get(CRC32C_KEY) == blob.crc32c
        and (item.crc32c is None or item.crc32c == blob.crc32c)
    )


def _transfer(
    bucket: storage.Bucket,
    source: Source,
    items: list[Item],
    console: Console,
    workers: int,
    on_bytes: OnBytes | None,
    verbose: bool = False,
) -> None:
    total = sum(item.size for item in items)
    metadata = {"source": source.origin}
    if source.revision:
        metadata["hf-revision"] = source.revision
    label = f"{source.kind} {source.source} -> gs://{bucket.name}/{source.prefix}/"
    console.print(f"Staging {label}: {len(items)} files, {human_bytes(total)}", soft_wrap=True)
    started = time.monotonic()
    with Reporter(console, source.kind, total, verbose=verbose) as reporter:

        def advance(path: str, count: int) -> None:
            reporter.advance(path, count)
            if on_bytes is not None:
                on_bytes(path, count)

        def one(item: Item, cancel: threading.Event) -> storage.Blob:
            def open_at(start: int) -> Iterator[bytes]:
                if item.url:
                    return hub_pieces(item, source.headers, cancel, start)
                return local_pieces(item, cancel, start)

            reporter.start(item)
            blob = upload(bucket, item, open_at, metadata, cancel=cancel, on_bytes=advance)
            reporter.finish(item)
            return blob

        has_token = any(name.lower() == "authorization" for name in source.headers)
        with hub_errors(source.kind, source.source, source.revision, source.page, has_token):
            try:
                run_parallel(items, one, workers)
            except TransferError as error:
                raise UserError(
                    f"Staging {source.kind} {source.source} failed: {error}",
                    "Run again: files already in the bucket are kept and only the rest is transferred.",
                ) from error
    seconds = max(time.monotonic() - started, 1e-6)
    console.print(
        f"Staged {human_bytes(total)} in {seconds:.1f} s ({human_bytes(total / seconds)}/s)", soft_wrap=True
    )


def _marker_document(source: Source) -> dict[str, Any]:
    return {
        "format": MARKER_FORMAT,
        "kind": source.kind,
        "source": source.origin,
        "revision": source.revision,
        "prefix": source.prefix,
        "bytes": source.bytes,
        "splits": source.splits,
        "files": [
            {"path": item.path, "size": item.size, item.digest_key: item.digest} for item in source.items
        ],
    }


def _marker_matches(marker: storage.Blob, source: Source, existing: dict[str, storage.Blob]) -> bool:
    """The marker describes exactly these files, and each object still has the crc32c it recorded."""
    try:
        document = json.loads(marker.download_as_bytes(retry=DEFAULT_RETRY))
    except (ValueError, exceptions.NotFound):
        return False
    expected = _marker_document(source)
    files = document.get("files", [])
    crc32cs = [entry.pop("crc32c", None) for entry in files if isinstance(entry, dict)]
    if {key: document.get(key) for key in expected} != expected:
        return False
    return all(
        (blob := existing.get(item.object_name)) is not None and blob.crc32c == crc32c
        for item, crc32c in zip(source.items, crc32cs, strict=True)
    )


def _write_marker(client: storage.Client, bucket: storage.Bucket, source: Source) -> None:
    """Written last: re-read every object so the marker records what the bucket really holds."""
    objects = {
        blob.name: blob for blob in client.list_blobs(bucket, prefix=source.prefix + "/", retry=DEFAULT_RETRY)
    }
    document = _marker_document(source)
    for item, entry in zip(source.items, document["files"], strict=True):
        blob = objects.get(item.object_name)
        if not _intact(blob, item):
            raise UserError(
                f"{item.object_name} changed in the bucket while staging.",
                "Another process may be writing the same prefix; run again when it is done.",
            )
        entry["crc32c"] = blob.crc32c  # type: ignore[union-attr]
    document["staged_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    bucket.blob(f"{source.prefix}/{MARKER}").upload_from_string(
        json.dumps(document, indent=1), content_type="application/json", retry=DEFAULT_RETRY
    )


def check_trainer_sizes(
    clients: Clients, settings: Settings, args: list[str], only: list[str] | None = None
) -> None:
    """The trainer's --train-size / --eval-size in `args` (the job's arguments) against the splits of the
    dataset they read, as recorded when it was staged; nothing to check when they were not recorded."""
    if only is not None and not {key for key, _ in overrides.SIZES} & set(only):
        return  # no size to check: read nothing
    prefix = jobs.staged_prefix(args, "--dataset")
    splits = staged_splits(clients.storage, settings.bucket, prefix) if prefix else None
    if splits:
        overrides.check_sizes(args, splits, f"gs://{settings.bucket}/{prefix}/", only)


def staged_splits(client: storage.Client, bucket: str, prefix: str) -> dict[str, int] | None:
    """The split sizes recorded when the dataset under `prefix` was staged; None when unknown."""
    with storage_errors(bucket):
        splits = (read_marker(client, bucket, prefix) or {}).get("splits")
    return splits if isinstance(splits, dict) else None


def read_marker(client: storage.Client, bucket: str, prefix: str) -> dict[str, Any] | None:
    """The completion marker of a staged prefix, or None when that prefix is not completely staged."""
    blob = client.bucket(bucket).blob(f"{prefix}/{MARKER}")
    try:
        return json.loads(blob.download_as_bytes(retry=DEFAULT_RETRY))
    except (exceptions.NotFound, ValueError):
        return None
