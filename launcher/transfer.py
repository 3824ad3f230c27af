"""Moving files into Cloud Storage: Hub downloads streamed straight into resumable uploads, several at once.

Nothing touches the local disk, so a 55 GB model needs no 55 GB of free space, and downloading overlaps
uploading: each file's bytes are fetched one upload chunk ahead by a reader thread while the previous
chunk is being sent. Bytes are hashed as they arrive and the last piece of a file is held back until the
digest equals the one the Hub publishes (LFS sha256, or the git blob id for small files), so an object
only comes into existence with verified content; google-cloud-storage then checks the object's crc32c
against the bytes it sent, and that crc32c is recorded in the object's metadata so a later run can tell
a verified object from one replaced behind its back.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import google_crc32c
import httpx2
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from huggingface_hub.utils import get_session, hf_raise_for_status
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

PIECE = 1 << 20
# Resumable upload chunks must be multiples of 256 KiB; 32 MiB keeps per-request overhead small while a
# worker holds at most two chunks in memory (the one being sent and the one being fetched).
CHUNK_SIZE = 32 << 20
SMALL_FILE = 8 << 20  # up to this size a file is fetched whole and sent in a single request
WORKERS = 8
CRC32C_KEY = "verified-crc32c"
_DOWNLOAD_ATTEMPTS = 6

OnBytes = Callable[[str, int], None]
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One file to put in the bucket: where it comes from and what its bytes must hash to."""

    path: str  # relative to the source, with '/'
    object_name: str
    size: int
    digest_key: str  # object metadata key: "hf-sha256" (LFS), "hf-etag" (git blob id) or "sha256" (local)
    digest: str
    url: str | None = None  # Hub resolve URL pinned to a commit
    local: Path | None = None
    crc32c: str | None = None  # known before the upload for local files


class TransferError(Exception):
    """A file could not be moved intact; the message names it."""


class Cancelled(Exception):
    """Another file failed or the user interrupted: stop without completing this object."""


def new_digest(key: str, size: int) -> Any:
    if key == "hf-etag":
        # The Hub's id of a non-LFS file is its git blob hash: sha1 over a header and the content.
        digest = hashlib.sha1(usedforsecurity=False)
        digest.update(b"blob %d\0" % size)
        return digest
    return hashlib.sha256()


def crc32c_text(checksum: google_crc32c.Checksum) -> str:
    """The base64 big-endian form Cloud Storage reports in an object's crc32c field."""
    return base64.b64encode(checksum.digest()).decode("ascii")


def hub_pieces(item: Item, headers: dict[str, str], cancel: threading.Event) -> Iterator[bytes]:
    """Stream a Hub file; a dropped connection resumes where it stopped with a Range request."""
    assert item.url is not None
    position = 0
    failures = 0
    while True:
        request_headers = {**headers, "Accept-Encoding": "identity"}
        if position:
            request_headers["Range"] = f"bytes={position}-"
        try:
            with get_session().stream(
                "GET", item.url, headers=request_headers, timeout=httpx2.Timeout(60.0)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    if response.status_code in (429, 500, 502, 503, 504):
                        raise _Retryable(f"HTTP {response.status_code}")
                    hf_raise_for_status(response)
                if position and response.status_code != 206:
                    raise TransferError(f"{item.path}: the Hub ignored a Range request; cannot resume it")
                for piece in response.iter_bytes(PIECE):
                    if cancel.is_set():
                        raise Cancelled
                    position += len(piece)
                    yield piece
            if position >= item.size:
                return
            raise _Retryable(f"connection closed after {position} of {item.size} bytes")
        except (httpx2.TransportError, _Retryable) as error:
            failures += 1
            if failures >= _DOWNLOAD_ATTEMPTS:
                raise TransferError(
                    f"{item.path}: download kept failing ({error}) after {failures} attempts"
                ) from error
            if cancel.wait(min(0.5 * 2**failures, 10.0)):
                raise Cancelled from error


class _Retryable(Exception):
    pass


def local_pieces(item: Item, cancel: threading.Event) -> Iterator[bytes]:
    assert item.local is not None
    with item.local.open("rb") as source:
        while piece := source.read(PIECE):
            if cancel.is_set():
                raise Cancelled
            yield piece


def verified(pieces: Iterator[bytes], item: Item, on_bytes: OnBytes | None) -> Iterator[bytes]:
    """Pass pieces through, failing before the last one unless size and digest match."""
    digest = new_digest(item.digest_key, item.size)
    seen = 0
    for piece in pieces:
        seen += len(piece)
        if seen > item.size:
            raise TransferError(f"{item.path}: more bytes than the {item.size} expected")
        digest.update(piece)
        if seen == item.size:
            _check_digest(item, digest)
        if on_bytes is not None:
            on_bytes(item.path, len(piece))
        yield piece
    if seen != item.size:
        raise TransferError(f"{item.path}: got {seen} bytes, expected {item.size}")
    if item.size == 0:
        _check_digest(item, digest)


def _check_digest(item: Item, digest: Any) -> None:
    if digest.hexdigest() != item.digest:
        raise TransferError(
            f"{item.path}: content does not match its published hash ({item.digest_key} {item.digest})"
        )


_END = object()


class Pipe:
    """A file-like view of pieces produced by a background thread, one upload chunk ahead.

    The resumable upload reads it with read(chunk_size) and tell(), nothing else.
    """

    def __init__(self, pieces: Iterator[bytes], ahead: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, ahead // PIECE))
        self._buffer = bytearray()
        self._position = 0
        self._finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(pieces,), daemon=True)
        self._thread.start()

    def _fill(self, pieces: Iterator[bytes]) -> None:
        try:
            for piece in pieces:
                if not self._put(piece):
                    return
            self._put(_END)
        except BaseException as error:  # handed to the reading thread, which re-raises it
            self._put(error)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        while not self._finished and (size < 0 or len(self._buffer) < size):
            item = self._queue.get()
            if item is _END:
                self._finished = True
            elif isinstance(item, BaseException):
                self._finished = True
                raise item
            else:
                self._buffer += item  # type: ignore[operator]
        count = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        self._position += count
        return data

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Pipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def upload(
    bucket: storage.Bucket,
    item: Item,
    pieces: Iterator[bytes],
    metadata: dict[str, str],
    *,
    chunk_size: int = CHUNK_SIZE,
) -> storage.Blob:
    """Create the object from verified pieces; returns the blob as the server described it."""
    content_type = mimetypes.guess_type(item.path)[0] or "application/octet-stream"
    metadata = {**metadata, item.digest_key: item.digest}
    if item.size <= SMALL_FILE:
        data = b"".join(pieces)
        blob = bucket.blob(item.object_name)
        blob.metadata = {**metadata, CRC32C_KEY: crc32c_text(google_crc32c.Checksum(data))}
        blob.upload_from_string(data, content_type=content_type, checksum="crc32c", retry=DEFAULT_RETRY)
    else:
        blob = bucket.blob(item.object_name, chunk_size=chunk_size)
        blob.metadata = {**metadata, CRC32C_KEY: item.crc32c} if item.crc32c else metadata
        with Pipe(pieces, ahead=chunk_size) as pipe:
            blob.upload_from_file(
                pipe, size=item.size, content_type=content_type, checksum="crc32c", retry=DEFAULT_RETRY
            )
        if not item.crc32c:
            # The client library has compared the server's crc32c with the bytes it sent: record it.
            blob.metadata = {**metadata, CRC32C_KEY: blob.crc32c}
            blob.patch(retry=DEFAULT_RETRY)
    if blob.size != item.size or blob.metadata.get(CRC32C_KEY) != blob.crc32c:
        raise TransferError(
            f"{item.path}: the bucket holds {blob.size} bytes with crc32c {blob.crc32c}, expected "
            f"{item.size} bytes with crc32c {blob.metadata.get(CRC32C_KEY)}"
        )
    return blob


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


class Reporter:
    """Progress: total bytes, rate and ETA on a terminal; one line per finished file otherwise."""

    def __init__(self, console: Console, label: str, total: int) -> None:
        self._console = console
        self._live = console.is_terminal
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}
        self._tasks: dict[str, TaskID] = {}
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not self._live,
        )
        self._total = self._progress.add_task(label, total=total)

    def __enter__(self) -> Reporter:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, item: Item) -> None:
        with self._lock:
            self._started[item.path] = time.monotonic()
            if self._live:
                self._tasks[item.path] = self._progress.add_task(f"  {item.path}", total=item.size)

    def advance(self, path: str, count: int) -> None:
        self._progress.advance(self._total, count)
        task = self._tasks.get(path)
        if task is not None:
            self._progress.advance(task, count)

    def finish(self, item: Item) -> None:
        with self._lock:
            seconds = max(time.monotonic() - self._started.pop(item.path, time.monotonic()), 1e-6)
            task = self._tasks.pop(item.path, None)
        if task is not None:
            self._progress.remove_task(task)
        else:
            self._console.print(
                f"  uploaded {item.path} ({human_bytes(item.size)} in {seconds:.1f} s, "
                f"{human_bytes(item.size / seconds)}/s)",
                soft_wrap=True,
                highlight=False,
            )


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
