"""What to stage: a Hub repo pinned to one commit, or a local directory, each file with its size and hash
listed before anything moves; and which sources a command uses.

Layout: a Hub model goes to gs://BUCKET/<model id>/ (the Cloud Run GPU tutorial's layout, so its job
arguments keep working), a local model directory to models/<dir name>/, a dataset to datasets/<name>/.

What was staged last is recorded in the bucket, next to the staged copies (SOURCES: each kind's source,
the revision asked for, and the model_id / dataset_id setting it stood in for), so later commands
(`up --skip-stage`, `up --gpu ...`, `stage`) keep using those sources until the user names others: with
--model-source / --dataset-source, or by changing model_id / dataset_id (a GPU whose default model
differs changes it: `up --gpu nvidia-l4` after the 27B default stages 4B). The bucket, not this machine
nor the job, holds it because the bucket is what every machine and teammate working on the project
shares, `stage` alone changes no job, and the job's arguments give only the mount path, not the
directory or Hub revision it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
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

from launcher.cloud_errors import hub_errors, storage_errors
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.staging.transfer import PIECE, Item, crc32c_text

SOURCES = ".gemma-launch/sources.json"
# A staged prefix's completion marker (launcher/staging/bucket.py); never staged from a directory.
MARKER = ".gemma-launch-staged.json"
# Never worth staging from a local directory: git internals and huggingface_hub's download bookkeeping.
_SKIP_DIRS = {".git", ".cache", "__pycache__"}
_OFFICIAL_FILES = ("list.txt", "trainval.txt", "test.txt")


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
            if is_local(source) and not Path(source).is_dir():
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


def record_sources(
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


def is_local(source: str) -> bool:
    return Path(source).expanduser().is_dir() or source.startswith(("/", ".", "~"))


def _local_name(source: str) -> str:
    return Path(source).expanduser().resolve().name


def model_prefix(source: str) -> str:
    """Hub id -> the id itself (the tutorial's layout); local directory -> models/<dir name>."""
    if is_local(source):
        return f"models/{_local_name(source)}"
    return source.strip("/")


def dataset_prefix(source: str) -> str:
    """Hub id or directory -> datasets/<last path part>, e.g. datasets/oxford-iiit-pet."""
    name = _local_name(source) if is_local(source) else source.strip("/").rsplit("/", 1)[-1]
    return f"datasets/{name}"


def resolve_source(kind: str, source: str, revision: str | None, token: str | None) -> Source:
    """List what `source` holds: a local directory, or a Hub repo at `revision` (default: main)."""
    if is_local(source):
        return _local_source(kind, source)
    return hub_source(kind, source, revision, token)


def check_named_sources(model_source: str | None, dataset_source: str | None) -> None:
    """What can be known of --model-source / --dataset-source on this machine, before anything is created:
    a directory exists and holds a model or the pets, anything else looks like a Hub id (owner/name)."""
    for kind, source in (("model", model_source), ("dataset", dataset_source)):
        if not source:
            continue
        if is_local(source):
            _check_local(kind, source)
        elif "/" not in source.strip("/"):
            example = "google/gemma-3-4b-it" if kind == "model" else "timm/oxford-iiit-pet"
            raise UserError(
                f"--{kind}-source {source} is neither a directory here nor a Hugging Face {kind} id "
                "(owner/name).",
                f"Pass the path of a local {kind} directory (./{source} if it is meant to be one), or a Hub "
                f"id such as {example}.",
            )


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


# Cloud Storage refuses an object name over 1024 bytes of UTF-8 or with a line break in it
# (https://cloud.google.com/storage/docs/objects#naming): said before anything is uploaded, not midway.
_MAX_OBJECT_NAME_BYTES = 1024


def _check_object_name(name: str, path: Path) -> None:
    if "\r" in name or "\n" in name or len(name.encode()) > _MAX_OBJECT_NAME_BYTES:
        raise UserError(
            f"{str(path)!r} cannot be staged: Cloud Storage object names have no line breaks and are at "
            f"most {_MAX_OBJECT_NAME_BYTES} bytes, and this file's would be {len(name.encode())} bytes.",
            "Rename the file (or move it out of the directory), then stage again.",
        )


def _local_source(kind: str, source: str) -> Source:
    root = _check_local(kind, source)
    prefix = (model_prefix if kind == "model" else dataset_prefix)(source)
    items = []
    for path in _walk(root):
        relative = path.relative_to(root).as_posix()
        _check_object_name(f"{prefix}/{relative}", path)
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
