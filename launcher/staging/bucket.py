"""A source's copy in the bucket: what it holds, what staging changes, the completion marker.

A staged prefix is complete only when its marker object (`.gemma-launch-staged.json`, listing every
file's size and hashes and the Hub revision; for a dataset also its split sizes, which `up` and `run` check
the trainer's sizes against) exists and agrees with the objects: the marker is checked
first, deleted before anything under the prefix changes, and written last. Each object carries the
Hub's hash and the crc32c verified at upload in its metadata, so a re-run skips what is intact,
re-uploads what is missing or altered, and removes files it staged that the source no longer has.

Storage calls use google-cloud-storage's own DEFAULT_RETRY: unlike launcher.cloud.RETRY it also retries
dropped connections, which long transfers meet.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

from google.api_core import exceptions
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from launcher import job as jobs
from launcher import overrides
from launcher.cloud import Clients
from launcher.cloud_errors import hub_errors, storage_errors
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.staging.events import (
    BytesMoved,
    FileDone,
    FileStarted,
    OnEvent,
    TransferEnded,
    TransferStarted,
    ignore,
)
from launcher.staging.sources import MARKER, Source
from launcher.staging.transfer import (
    CRC32C_KEY,
    WORKERS,
    Cancelled,
    Item,
    TransferError,
    hub_pieces,
    human_bytes,
    local_pieces,
    upload,
)

MARKER_FORMAT = 1
# Metadata keys that identify an object this tool staged (and may therefore replace or delete).
_DIGEST_KEYS = ("hf-sha256", "hf-etag", "sha256")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """What staging one source did to its prefix (launcher.staging.stage reports it as a Change)."""

    status: str  # "created" | "updated" | "unchanged" | "would create" | "would update"
    diff: tuple[str, ...] = ()  # what an update changes: files to upload, files to delete


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


def stage_source(
    client: storage.Client,
    bucket: storage.Bucket | None,
    source: Source,
    *,
    dry_run: bool = False,
    workers: int = WORKERS,
    on_event: OnEvent = ignore,
) -> Outcome:
    """Make the prefix hold exactly `source`'s files, then its marker; what is intact stays untouched."""

    def outcome(status: str, plan: _Plan | None = None) -> Outcome:
        return Outcome(status, plan.diff() if plan and plan.ours else ())

    if bucket is None:  # dry run before `up` created the bucket
        return outcome("would create")
    with storage_errors(bucket.name):
        plan = read_plan(client, bucket, source)
        if plan.unchanged:
            return outcome("unchanged")
        if dry_run:
            return outcome("would update" if plan.ours else "would create", plan)
        if plan.marker is not None:
            # From here until the new marker is written, the prefix must not read as complete.
            plan.marker.delete(retry=DEFAULT_RETRY)
        if plan.missing:
            _transfer(bucket, source, plan.missing, workers, on_event)
        for blob in plan.stale:
            blob.delete(retry=DEFAULT_RETRY)
        _write_marker(client, bucket, source)
    return outcome("updated" if plan.ours else "created", plan)


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


def read_plan(client: storage.Client, bucket: storage.Bucket, source: Source) -> _Plan:
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
    bucket: storage.Bucket, source: Source, items: list[Item], workers: int, on_event: OnEvent
) -> None:
    total = sum(item.size for item in items)
    metadata = {"source": source.origin}
    if source.revision:
        metadata["hf-revision"] = source.revision
    label = f"{source.kind} {source.source} -> gs://{bucket.name}/{source.prefix}/"
    on_event(TransferStarted(source.kind, label, len(items), total))
    started = time.monotonic()

    def advance(path: str, count: int) -> None:
        on_event(BytesMoved(path, count))

    def one(item: Item, cancel: threading.Event) -> storage.Blob:
        def open_at(start: int) -> Iterator[bytes]:
            if item.url:
                return hub_pieces(item, source.headers, cancel, start)
            return local_pieces(item, cancel, start)

        on_event(FileStarted(item.path, item.size))
        began = time.monotonic()
        blob = upload(bucket, item, open_at, metadata, cancel=cancel, on_bytes=advance)
        on_event(FileDone(item.path, item.size, max(time.monotonic() - began, 1e-6)))
        return blob

    has_token = any(name.lower() == "authorization" for name in source.headers)
    ok = False
    try:
        with hub_errors(source.kind, source.source, source.revision, source.page, has_token):
            try:
                run_parallel(items, one, workers)
            except TransferError as error:
                raise UserError(
                    f"Staging {source.kind} {source.source} failed: {error}",
                    "Run again: files already in the bucket are kept and only the rest is transferred.",
                ) from error
        ok = True
    finally:
        on_event(TransferEnded(total, max(time.monotonic() - started, 1e-6), ok))


def run_parallel(items: list[Item], work: Callable[[Item, threading.Event], T], workers: int) -> list[T]:
    """Run `work` on every item, largest first; the first failure (or Ctrl-C) cancels the rest."""
    cancel = threading.Event()
    ordered = sorted(items, key=lambda item: item.size, reverse=True)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items))), thread_name_prefix="stage") as pool:
        futures: list[Future[T]] = [pool.submit(work, item, cancel) for item in ordered]
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [future for future in done if future.exception() is not None]
            if failed:
                raise _first_real_error(failed)
        except BaseException:
            cancel.set()
            for future in futures:
                future.cancel()
            raise
    return [future.result() for future in futures]


def _first_real_error(failed: list[Future[Any]]) -> BaseException:
    errors = [future.exception() for future in failed]
    for error in errors:
        if not isinstance(error, Cancelled):
            return error  # type: ignore[return-value]
    return errors[0]  # type: ignore[return-value]


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
    clients: Clients,
    settings: Settings,
    args: list[str],
    only: list[str] | None = None,
    grid: list[str] | None = None,
) -> None:
    """The trainer's --train-size / --eval-size in `args` (the job's arguments) against the splits of the
    dataset they read, as recorded when it was staged; nothing to check when they were not recorded.
    `grid`: a sweep's grid settings (overrides.check_sizes)."""
    if only is not None and not {key for key, _ in overrides.SIZES} & set(only):
        return  # no size to check: read nothing
    prefix = jobs.staged_prefix(args, "--dataset")
    splits = staged_splits(clients.storage, settings.bucket, prefix) if prefix else None
    if splits:
        overrides.check_sizes(args, splits, f"gs://{settings.bucket}/{prefix}/", only, grid)


def sizes_to_set(clients: Clients, settings: Settings, args: list[str]) -> dict[str, int]:
    """The sizes a run of the job's arguments `args` must set to fit the dataset they read, each the size
    of its split: a dataset smaller than the trainer's defaults (a rehearsal's) needs them; empty when
    they fit or the splits were not recorded."""
    prefix = jobs.staged_prefix(args, "--dataset")
    splits = staged_splits(clients.storage, settings.bucket, prefix) if prefix else None
    if not splits:
        return {}
    return {key: available for key, (_, available) in overrides.too_large(args, splits).items()}


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
