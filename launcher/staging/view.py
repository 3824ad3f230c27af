"""Staging's events as a person reads them: total bytes, rate and time left as live bars on a terminal;
elsewhere (a pipe, a CI log, the staging job's log) a line at each quarter of the bytes, or with
`verbose` one line per finished file. The CLI and the staging job each hand one to `stage` as its
listener."""

from __future__ import annotations

import threading
import time

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

from launcher.progress import QUARTERS, Pace, Quarters, duration
from launcher.staging.events import (
    BytesMoved,
    Event,
    FileDone,
    FileStarted,
    JobLine,
    Note,
    TransferEnded,
    TransferStarted,
)
from launcher.staging.transfer import human_bytes


class StagingView:
    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self._console = console
        self._live = console.is_terminal
        self._verbose = verbose
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._total = TaskID(0)
        self._tasks: dict[str, TaskID] = {}
        self._label = ""
        self._done = 0
        self._quarters = Quarters(0)
        self._pace = Pace()

    def __call__(self, event: Event) -> None:
        match event:
            case Note(text):
                self._console.print(text, soft_wrap=True)
            case JobLine(line):
                self._console.print(f"  {line.render()}", markup=False, highlight=False, soft_wrap=True)
            case TransferStarted():
                self._start(event)
            case FileStarted(path, size) if self._progress is not None and self._live:
                with self._lock:
                    self._tasks[path] = self._progress.add_task(f"  {path}", total=size)
            case BytesMoved(path, count):
                self._advance(path, count)
            case FileDone():
                self._finish(event)
            case TransferEnded(total, seconds, ok):
                if self._progress is not None:
                    self._progress.stop()
                    self._progress = None
                if ok:
                    # Under a tenth of a second (a few small files) the time and rate are noise, not news.
                    took = (
                        f"in {seconds:.1f} s ({human_bytes(total / seconds)}/s)"
                        if seconds >= 0.05
                        else "in under 0.1 s"
                    )
                    self._console.print(f"Staged {human_bytes(total)} {took}", soft_wrap=True)

    def _start(self, event: TransferStarted) -> None:
        self._console.print(
            f"Staging {event.label}: {event.files} files, {human_bytes(event.bytes)}", soft_wrap=True
        )
        self._label = event.kind
        self._done = 0
        self._tasks = {}
        self._quarters = Quarters(event.bytes, QUARTERS[:-1])  # TransferEnded says when it is all done
        self._pace = Pace()
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self._console,
            transient=False,
            disable=not self._live,
        )
        self._total = self._progress.add_task(event.kind, total=event.bytes)
        self._progress.start()

    def _advance(self, path: str, count: int) -> None:
        if self._progress is None:
            return
        self._progress.advance(self._total, count)
        task = self._tasks.get(path)
        if task is not None:
            self._progress.advance(task, count)
        if self._live or self._verbose:
            return
        with self._lock:
            self._done += count
            total = self._quarters.total
            left = self._pace.left(self._done, total, time.monotonic())
            # A quarter passed, shown as the share actually moved: one large file passes several at once.
            # The last bytes print nothing: TransferEnded's "Staged ..." line says it is all there.
            if self._quarters.passed(self._done) is None or self._done >= total:
                return
            eta = f", about {duration(left)} left" if left is not None and left >= 1 else ""
            # Floored: a line that says 100% while bytes are still to come reads as a hang.
            percent = self._done * 100 // total
            self._console.print(
                f"  {self._label}: {percent}% ({human_bytes(self._done)} of {human_bytes(total)}){eta}",
                soft_wrap=True,
                highlight=False,
            )

    def _finish(self, event: FileDone) -> None:
        with self._lock:
            task = self._tasks.pop(event.path, None)
        if task is not None and self._progress is not None:
            self._progress.remove_task(task)
        elif self._verbose:
            self._console.print(
                f"  uploaded {event.path} ({human_bytes(event.size)} in {event.seconds:.1f} s, "
                f"{human_bytes(event.size / event.seconds)}/s)",
                soft_wrap=True,
                highlight=False,
            )
