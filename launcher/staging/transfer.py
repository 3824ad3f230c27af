"""Moving files into Cloud Storage: Hub downloads streamed straight into uploads, several files at once.

Nothing touches the local disk, so a 55 GB model needs no 55 GB of free space. Each large file is one
resumable upload session fed by a single streaming request (Cloud Storage's recommended form: no
per-chunk round trips, memory bounded by a small read-ahead), while a reader thread fetches from the
Hub so downloading overlaps uploading. If either side breaks mid-file, the upload resumes at the
offset Cloud Storage reports as persisted and the Hub download restarts there with a Range request;
the hashes restart from a checkpoint taken every 64 MiB, so no byte is hashed twice into the result.

Bytes are hashed as they arrive and the last piece of a file is held back until the digest equals the
one the Hub publishes (LFS sha256, or the git blob id for small files), so an object only comes into
existence with verified content. The object's crc32c, as Cloud Storage computed it, must equal the
crc32c of the bytes sent; it is then recorded in the object's metadata, so a later run can tell a
verified object from one replaced behind its back.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import httpx2
import requests
from google.api_core import exceptions
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from huggingface_hub.utils import get_session, hf_raise_for_status

PIECE = 1 << 20
READ_AHEAD = 16 << 20  # per file being uploaded: what the reader thread may fetch ahead of the upload
CHECKPOINT = 64 << 20  # hash state kept every this many bytes, to resume an upload mid-file
SMALL_FILE = 8 << 20  # up to this size a file is fetched whole and sent in one multipart request
WORKERS = 8
CRC32C_KEY = "verified-crc32c"
_DOWNLOAD_ATTEMPTS = 6
_UPLOAD_ATTEMPTS = 6
_RETRYABLE_STATUS = (308, 408, 429, 500, 502, 503, 504)
_PERSISTED = re.compile(r"^bytes=0-(?P<end>\d+)$")

OnBytes = Callable[[str, int], None]


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


def hub_pieces(
    item: Item, headers: dict[str, str], cancel: threading.Event, start: int = 0
) -> Iterator[bytes]:
    """Stream a Hub file from `start`; a dropped connection resumes where it stopped with a Range request."""
    assert item.url is not None
    position = start
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


def local_pieces(item: Item, cancel: threading.Event, start: int = 0) -> Iterator[bytes]:
    assert item.local is not None
    with item.local.open("rb") as source:
        source.seek(start)
        while piece := source.read(PIECE):
            if cancel.is_set():
                raise Cancelled
            yield piece


class Digests:
    """The source hash and crc32c of a file's bytes so far, with checkpoints to restart from."""

    def __init__(self, item: Item) -> None:
        self.item = item
        self.position = 0
        self.digest = new_digest(item.digest_key, item.size)
        self.crc32c = google_crc32c.Checksum()
        self._checkpoints = {0: (self.digest.copy(), self.crc32c.copy())}

    def update(self, piece: bytes) -> None:
        self.position += len(piece)
        if self.position > self.item.size:
            raise TransferError(f"{self.item.path}: more bytes than the {self.item.size} expected")
        self.digest.update(piece)
        self.crc32c.update(piece)
        if self.position - max(self._checkpoints) >= CHECKPOINT:
            self._checkpoints[self.position] = (self.digest.copy(), self.crc32c.copy())
        if self.position == self.item.size:
            self.check()

    def check(self) -> None:
        if self.digest.hexdigest() != self.item.digest:
            raise TransferError(
                f"{self.item.path}: content does not match its published hash "
                f"({self.item.digest_key} {self.item.digest})"
            )

    def rewind(self, offset: int) -> int:
        """Go back to the last checkpoint at or before `offset`; returns its position."""
        position = max(point for point in self._checkpoints if point <= offset)
        digest, crc32c = self._checkpoints[position]
        self.digest, self.crc32c, self.position = digest.copy(), crc32c.copy(), position
        return position


def _body(
    pieces: Iterator[bytes], digests: Digests, send_from: int, progress: Callable[[int], None]
) -> Iterator[bytes]:
    """Hash every piece; pass on only the bytes from `send_from`, the last one only once verified."""
    for piece in pieces:
        before = digests.position
        digests.update(piece)
        progress(digests.position)
        if digests.position > send_from:
            yield piece[max(0, send_from - before) :]
    item = digests.item
    if digests.position != item.size:
        raise TransferError(f"{item.path}: got {digests.position} bytes, expected {item.size}")
    if item.size == 0:
        digests.check()


_END = object()


class Pipe:
    """A file-like view, with a length, of pieces produced by a background thread a little ahead.

    The HTTP client reads it in small blocks while the thread keeps fetching, so the download and the
    upload of one file proceed at the same time.
    """

    def __init__(self, pieces: Iterator[bytes], length: int, ahead: int = READ_AHEAD) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, ahead // PIECE))
        self._buffer = bytearray()
        self._length = length
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

    def __len__(self) -> int:
        return self._length

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
        return data

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


Opener = Callable[[int], Iterator[bytes]]


def upload(
    bucket: storage.Bucket,
    item: Item,
    open_at: Opener,
    metadata: dict[str, str],
    *,
    cancel: threading.Event,
    on_bytes: OnBytes | None = None,
) -> storage.Blob:
    """Create the object from the verified bytes `open_at(offset)` yields; returns it as the server has it."""
    content_type = mimetypes.guess_type(item.path)[0] or "application/octet-stream"
    metadata = {**metadata, item.digest_key: item.digest}
    reported = 0

    def progress(position: int) -> None:
        nonlocal reported
        if position > reported and on_bytes is not None:
            on_bytes(item.path, position - reported)
        reported = max(reported, position)

    digests = Digests(item)
    blob = bucket.blob(item.object_name)
    if item.size <= SMALL_FILE:
        data = b"".join(_body(open_at(0), digests, 0, progress))
        blob.metadata = {**metadata, CRC32C_KEY: crc32c_text(digests.crc32c)}
        blob.upload_from_string(data, content_type=content_type, checksum="crc32c", retry=DEFAULT_RETRY)
    else:
        blob.metadata = {**metadata, CRC32C_KEY: item.crc32c} if item.crc32c else metadata
        _stream(blob, item, open_at, digests, progress, content_type, cancel)
        blob.reload(retry=DEFAULT_RETRY)
        if blob.crc32c != crc32c_text(digests.crc32c):
            blob.delete(retry=DEFAULT_RETRY)
            raise TransferError(
                f"{item.path}: Cloud Storage computed crc32c {blob.crc32c}, the bytes sent have "
                f"{crc32c_text(digests.crc32c)}; the object was removed"
            )
        if not item.crc32c:
            blob.metadata = {**metadata, CRC32C_KEY: blob.crc32c}
            blob.patch(retry=DEFAULT_RETRY)
    if blob.size != item.size or blob.metadata.get(CRC32C_KEY) != blob.crc32c:
        raise TransferError(
            f"{item.path}: the bucket holds {blob.size} bytes with crc32c {blob.crc32c}, expected "
            f"{item.size} bytes with crc32c {blob.metadata.get(CRC32C_KEY)}"
        )
    return blob


def _stream(
    blob: storage.Blob,
    item: Item,
    open_at: Opener,
    digests: Digests,
    progress: Callable[[int], None],
    content_type: str,
    cancel: threading.Event,
) -> dict[str, Any]:
    """One resumable session fed by one streaming PUT; resumed at the persisted offset after a failure.

    Returns the object resource the server answered with.
    """
    transport = blob.client._http  # the client's authorized session, as its own uploads use
    session = _new_session(blob, item, content_type)
    persisted = 0
    for attempt in range(_UPLOAD_ATTEMPTS):
        start = digests.rewind(persisted)
        pipe = Pipe(_body(open_at(start), digests, persisted, progress), item.size - persisted)
        try:
            response = transport.request(
                "PUT",
                session,
                data=pipe,
                headers={"Content-Range": f"bytes {persisted}-{item.size - 1}/{item.size}"},
                timeout=(30, 600),
            )
        except requests.exceptions.RequestException as error:
            problem = str(error)
        else:
            if response.status_code in (200, 201):
                return response.json()
            if response.status_code not in _RETRYABLE_STATUS and not persisted:
                raise exceptions.from_http_response(response)
            problem = f"HTTP {response.status_code}"
            if response.status_code not in _RETRYABLE_STATUS:
                # Refused to resume at the offset it reported: start over in a new session.
                session, persisted = _new_session(blob, item, content_type), 0
                continue
        finally:
            pipe.close()
        if cancel.wait(min(0.5 * 2**attempt, 10.0)):
            raise Cancelled
        status = _session_status(transport, session, item.size)
        if isinstance(status, dict):
            return status
        if status is None:  # the session is gone: start over in a new one
            session, status = _new_session(blob, item, content_type), 0
        persisted = status
    raise TransferError(f"{item.path}: upload kept failing ({problem}) after {_UPLOAD_ATTEMPTS} attempts")


def _new_session(blob: storage.Blob, item: Item, content_type: str) -> str:
    return blob.create_resumable_upload_session(
        content_type=content_type, size=item.size, checksum=None, retry=DEFAULT_RETRY
    )


def _session_status(transport: Any, session: str, size: int) -> dict[str, Any] | int | None:
    """The finished object, the number of bytes persisted, or None when the session no longer exists."""
    response = transport.request("PUT", session, headers={"Content-Range": f"bytes */{size}"}, timeout=60)
    if response.status_code in (200, 201):
        return response.json()
    if response.status_code == 308:
        persisted = _PERSISTED.match(response.headers.get("Range", ""))
        return int(persisted["end"]) + 1 if persisted else 0
    if response.status_code in (404, 410):
        return None
    raise exceptions.from_http_response(response)


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"
