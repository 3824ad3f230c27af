"""Cloud Logging, read: the one reader of log entries, an execution's or a build's.

A Reader hands out each entry a filter matches once, in order, however it arrives: listed by
ListLogEntries as often as polled, or live through TailLogEntries. launcher/executions.py follows an
execution with both; launcher/build.py polls a build's log.

Every list counts against Cloud Logging's read quota, 60 ListLogEntries calls a minute per project,
shared with every other reader of the project's logs (the Logs Explorer, another gemma-launch). A list
refused for it is retried with backoff (cloud.RETRY, whose two minutes span two of the quota's windows),
and the Reader says once, through `notice`, that it is waiting.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.api_core import exceptions
from google.cloud.logging_v2.types import ListLogEntriesRequest, LogEntry, TailLogEntriesRequest
from google.protobuf import duration_pb2

from launcher.cloud import RETRY, Clients, is_transient

TASK_LABEL = "run.googleapis.com/task_index"
# Cloud Logging may ingest an entry a little after later ones: each poll looks this far behind the
# newest entry seen, and entries already handed out are skipped.
LOG_LAG_NS = 10 * 1_000_000_000
QUOTA_NOTICE = (
    "Waiting for Cloud Logging's read quota (60 log reads a minute per project, shared with every reader "
    "of its logs); the log carries on once it allows."
)


@dataclass(frozen=True)
class Line:
    timestamp: datetime | None
    task: str
    text: str

    def render(self) -> str:
        when = self.timestamp.strftime("%H:%M:%S") if self.timestamp else "--:--:--"
        task = f"[task {self.task}]" if self.task else "[job]"
        return f"{when} {task} {self.text}"

    def document(self) -> dict[str, Any]:
        """The line for `logs --json`: the task index as a number, None for the job's own lines."""
        return {
            "timestamp": self.timestamp.isoformat() if self.timestamp else None,
            "task": int(self.task) if self.task.isdigit() else None,
            "text": self.text,
        }


def line(entry: LogEntry) -> Line:
    text = entry.text_payload
    if not text and entry.json_payload:
        text = str(dict(entry.json_payload).get("message", dict(entry.json_payload)))
    timestamp = entry.timestamp if entry.timestamp else None
    return Line(timestamp, entry.labels.get(TASK_LABEL, ""), text.rstrip("\n"))


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _timestamp_ns(entry: LogEntry) -> int:
    moment = entry.timestamp
    if not moment:
        return 0
    return int(moment.timestamp()) * 1_000_000_000 + moment.nanosecond


def _rfc3339(ns: int) -> str:
    seconds, fraction = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{fraction:09d}Z"


class Reader:
    """The entries `log_filter` matches in the project, each handed out once: by `poll`, as often as
    called, and by `fresh`, which says whether an entry from a `tail` is new. `notice` hears, once, that
    a list waits for the read quota (on stderr unless told otherwise: stdout may be JSON)."""

    def __init__(
        self, clients: Clients, project: str, log_filter: str, notice: Callable[[str], None] = _to_stderr
    ) -> None:
        self._clients = clients
        self._project = project
        self._filter = log_filter
        self._newest_ns: int | None = None
        self._seen: set[tuple[int, str]] = set()
        self._notice = notice
        self._waited = False
        # RETRY's backoff and deadline; its predicate sees each error it retries, the quota's among them.
        self._retry = RETRY.with_predicate(self._retryable)

    def _retryable(self, error: Exception) -> bool:
        if isinstance(error, exceptions.ResourceExhausted) and not self._waited:
            self._waited = True
            self._notice(QUOTA_NOTICE)
        return is_transient(error)

    def fresh(self, entry: LogEntry) -> bool:
        """True the first time `entry` is seen, however it came."""
        key = (_timestamp_ns(entry), entry.insert_id)
        if key in self._seen:
            return False
        self._seen.add(key)
        self._newest_ns = max(self._newest_ns or key[0], key[0])
        return True

    def poll(self, *, everything: bool = False) -> list[LogEntry]:
        """The entries not handed out yet, oldest first. Each poll lists from a little before the newest
        entry seen; `everything` lists them all again (what a broken tail may have missed)."""
        query = self._filter
        if self._newest_ns is not None and not everything:
            query += f' AND timestamp>="{_rfc3339(self._newest_ns - LOG_LAG_NS)}"'
        return [entry for entry in self._list(query) if self.fresh(entry)]

    def _list(self, query: str) -> Iterator[LogEntry]:
        request = ListLogEntriesRequest(
            resource_names=[f"projects/{self._project}"],
            filter=query,
            order_by="timestamp asc",
            page_size=1000,
        )
        # Each page is a call of its own, retried alike (the pager passes the retry on).
        yield from self._clients.logging.list_log_entries(request=request, retry=self._retry)

    def tail(self) -> _Tail:
        """The filter's new entries, live, on a background thread; close() it when done."""
        return _Tail(self._clients, self._project, self._filter)


class _Tail:
    """A TailLogEntries stream read by a background thread into a queue.

    The stream is opened on that thread too: the client library waits for the first response before
    returning the stream, and an execution that logs nothing more would otherwise block the caller.
    """

    def __init__(self, clients: Clients, project: str, log_filter: str) -> None:
        self._request = TailLogEntriesRequest(
            resource_names=[f"projects/{project}"],
            filter=log_filter,
            buffer_window=duration_pb2.Duration(seconds=1),
        )
        self._clients = clients
        self._stream = None
        self._closed = threading.Event()
        self.entries: queue.Queue[LogEntry | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            self._stream = self._clients.logging.tail_log_entries(requests=iter([self._request]))
            if self._closed.is_set():
                self._stream.cancel()
            for response in self._stream:
                for entry in response.entries:
                    self.entries.put(entry)
        except (exceptions.GoogleAPICallError, grpc.RpcError):
            pass  # cancelled by close(), or the stream broke: the caller reopens or drains with a list
        finally:
            self.entries.put(None)

    def close(self) -> None:
        self._closed.set()
        if self._stream is not None:
            self._stream.cancel()
