"""Logs of one execution: history through ListLogEntries, then live through TailLogEntries.

The live tail is opened before the history is read, and entries are de-duplicated by insert id, so
nothing is missed or shown twice at the switch. When the execution ends, the tail is closed and a last
ListLogEntries drains whatever the tail's buffer window still held back.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from google.api_core import exceptions
from google.cloud.logging_v2.types import ListLogEntriesRequest, LogEntry, TailLogEntriesRequest
from google.protobuf import duration_pb2

from launcher import job as jobs
from launcher.cloud import RETRY, Clients
from launcher.settings import Settings

EXECUTION_LABEL = "run.googleapis.com/execution_name"
TASK_LABEL = "run.googleapis.com/task_index"


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


def execution_filter(settings: Settings, execution: str, task: int | None = None) -> str:
    """The execution's entries; `task`: only that task's (Cloud Run labels each with its index)."""
    found = (
        f'resource.type="cloud_run_job" AND resource.labels.job_name="{settings.job}" '
        f'AND labels."{EXECUTION_LABEL}"="{jobs.short_name(execution)}"'
    )
    return found if task is None else f'{found} AND labels."{TASK_LABEL}"="{task}"'


def _line(entry: LogEntry) -> Line:
    text = entry.text_payload
    if not text and entry.json_payload:
        text = str(dict(entry.json_payload).get("message", dict(entry.json_payload)))
    timestamp = entry.timestamp if entry.timestamp else None
    return Line(timestamp, entry.labels.get(TASK_LABEL, ""), text.rstrip("\n"))


def history(clients: Clients, settings: Settings, log_filter: str) -> Iterator[LogEntry]:
    request = ListLogEntriesRequest(
        resource_names=[f"projects/{settings.project_id}"],
        filter=log_filter,
        order_by="timestamp asc",
        page_size=1000,
    )
    yield from clients.logging.list_log_entries(request=request, retry=RETRY)


class _Tail:
    """A TailLogEntries stream read by a background thread into a queue.

    The stream is opened on that thread too: the client library waits for the first response before
    returning the stream, and an execution that logs nothing more would otherwise block the caller.
    """

    def __init__(self, clients: Clients, settings: Settings, log_filter: str) -> None:
        self._request = TailLogEntriesRequest(
            resource_names=[f"projects/{settings.project_id}"],
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


def stream(
    clients: Clients,
    settings: Settings,
    execution: str,
    *,
    follow: bool,
    emit: Callable[[Line], None],
    poll_s: float = 2.0,
    grace_s: float = 2.0,
    task: int | None = None,
) -> None:
    """Emit every log line of `execution` (`task`: of that task only); with `follow`, keep going until the
    execution has ended."""
    log_filter = execution_filter(settings, execution, task)
    seen: set[str] = set()

    def show(entry: LogEntry) -> None:
        if entry.insert_id in seen:
            return
        seen.add(entry.insert_id)
        emit(_line(entry))

    tail = _Tail(clients, settings, log_filter) if follow else None
    try:
        for entry in history(clients, settings, log_filter):
            show(entry)
        if tail is None:
            return
        next_check = 0.0
        done_at: float | None = None
        while True:
            now = time.monotonic()
            if done_at is None and now >= next_check:
                if jobs.is_done(jobs.get_execution(clients, settings, execution)):
                    # Lines written just before the end may still sit in the tail's buffer window.
                    done_at = now
                next_check = now + poll_s
            if done_at is not None and now - done_at >= grace_s:
                break
            try:
                entry = tail.entries.get(timeout=0.2)
            except queue.Empty:
                continue
            if entry is None:  # the stream ended on the server's side: reopen it, gently
                time.sleep(poll_s)
                tail = _Tail(clients, settings, log_filter)
                continue
            show(entry)
    finally:
        if tail is not None:
            tail.close()
    for entry in history(clients, settings, log_filter):
        show(entry)
