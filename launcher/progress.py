"""How long work shows its progress: a rich bar with the time left on a terminal, and elsewhere (a pipe,
a CI log, a file) a line at each quarter, so the output stays a few lines long however big the work.

Used for a build's steps (launcher/build.py's log, summarised by the CLI), training steps read from
the trainer's log during `run --follow`, and staged bytes (launcher/staging/view.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from launcher.logs import Line

QUARTERS = (0.25, 0.5, 0.75, 1.0)

# The trainer's line for each logging step (trainer/train.py, LogLine): "step 60/235 epoch 1.28 loss
# 1.5592 ...", and "step 235/235 trained in 41.2 s" when training ends.
TRAINING_STEP = re.compile(r"\bstep (?P<step>\d+)/(?P<total>\d+)\b")
_LOSS = re.compile(r"\bloss (?P<loss>\S+)")
_END = re.compile(r": training (?P<end>(?:done|stopped) in .+)$")


class Quarters:
    """Which quarter of a total the work has just passed, so that off a terminal it is told in four
    lines at most."""

    def __init__(self, total: float, marks: tuple[float, ...] = QUARTERS) -> None:
        self.total = total
        self._marks = marks
        self._next = 0

    def passed(self, done: float) -> float | None:
        """The highest mark `done` has reached since the last call; None when it reached none."""
        reached = None
        while self._next < len(self._marks) and done >= self._marks[self._next] * self.total:
            reached = self._marks[self._next]
            self._next += 1
        return reached


class Pace:
    """The time left, from the pace since the first report (not since the start: a resumed task or a
    build that queued would otherwise look slower than it runs)."""

    def __init__(self) -> None:
        self._first: tuple[float, float] | None = None

    def left(self, done: float, total: float, now: float) -> float | None:
        if self._first is None:
            self._first = (done, now)
            return None
        first_done, first_now = self._first
        if done <= first_done or now <= first_now:
            return None
        return (total - done) * (now - first_now) / (done - first_done)


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 2 h 10 min."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Steps:
    """Work counted in steps (a build's, the trainer's): a live bar with the time left on a terminal;
    elsewhere `say` gets a line at each quarter ("training: step 60/235 (26%), loss 1.56, about 1 min
    10 s left")."""

    def __init__(self, console: Console, label: str, total: int, say: Callable[[str], None]) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._say = say
        self._quarters = Quarters(total)
        self._pace = Pace()
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._live = console.is_terminal
        if self._live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            )
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def update(self, done: int, *, note: str = "", now: float | None = None) -> None:
        """`now`: when `done` was reached, in seconds (default: the monotonic clock)."""
        self.done = done
        left = self._pace.left(done, self.total, time.monotonic() if now is None else now)
        if self._live:
            if self._bar is not None and self._task is not None:
                description = f"{self.label}: {note}" if note else self.label
                self._bar.update(self._task, completed=done, description=description)
                if done >= self.total:  # left on the screen, complete, while what follows prints below
                    self.stop()
            return
        if self._quarters.passed(done) is None:
            return
        text = f"{self.label}: step {done}/{self.total} ({done / self.total:.0%})"
        text += f", {note}" if note else ""
        text += f", about {duration(left)} left" if left is not None and left >= 1 else ""
        self._say(text)

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def training_step(text: str) -> tuple[int, int, str] | None:
    """(step, total, a note: "loss 1.5592", "done in 41.2 s" or "") from a trainer log line; None for
    any other line."""
    found = TRAINING_STEP.search(text)
    if found is None:
        return None
    loss, end = _LOSS.search(text), _END.search(text)
    note = f"loss {loss['loss']}" if loss else end["end"] if end else ""
    return int(found["step"]), int(found["total"]), note


# Cloud Build's own lines around each step of a build's log (the emulator writes the same).
_BUILD_STEP = re.compile(r'^(?P<event>Starting|Finished) Step #(?P<index>\d+)(?: - "(?P<id>[^"]*)")?$')


class BuildView:
    """A build's log as `up` shows it: every line with `verbose`; otherwise the line that names the
    build, then its steps: a bar on a terminal, a line at each quarter elsewhere."""

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self._console = console
        self._verbose = verbose
        self._steps: Steps | None = None
        self._ids: list[str] = []

    def _say(self, text: str) -> None:
        self._console.print(f"  {text}", style="dim", markup=False, soft_wrap=True)

    def steps(self, ids: list[str]) -> None:
        """The build started with these steps (a build started again: anew)."""
        self._ids = ids
        self.stop()
        if not self._verbose and ids:
            self._steps = Steps(self._console, "Cloud Build", len(ids), self._say)

    def line(self, text: str) -> None:
        # Lines of the launcher's own about a build ("Cloud Build ID started", "... building again") show
        # always; the build's log's own lines, as steps.
        if self._verbose or text.startswith("Cloud Build "):
            self.stop()
            self._say(text)
            return
        found = _BUILD_STEP.match(text)
        if found is None or self._steps is None:
            return
        index = int(found["index"])
        name = found["id"] or (self._ids[index] if index < len(self._ids) else f"#{index}")
        self._steps.update(index + (found["event"] == "Finished"), note=name)

    def stop(self) -> None:
        if self._steps is not None:
            self._steps.stop()
            self._steps = None


class TrainingView:
    """An execution's log as `run --follow` and `logs --follow` show it: every line with `verbose`;
    otherwise the trainer's step lines become, per task, a bar on a terminal or a line at each quarter
    elsewhere (the time left is paced by the lines' own timestamps), and every other line is shown."""

    def __init__(self, console: Console, emit: Callable[[Line], None], *, verbose: bool = False) -> None:
        self._console = console
        self._emit = emit
        self._verbose = verbose
        self._meters: dict[str, Steps] = {}
        self._line: Line | None = None

    def _say(self, text: str) -> None:
        assert self._line is not None
        self._emit(Line(self._line.timestamp, self._line.task, text))

    def __call__(self, line: Line) -> None:
        step = None if self._verbose else training_step(line.text)
        if step is None:
            self._emit(line)
            return
        done, total, note = step
        self._line = line
        meter = self._meters.get(line.task)
        # A new count of steps, or steps again after the end (another attempt): a new bar.
        if meter is None or meter.total != total or meter.finished:
            if meter is not None:
                meter.stop()
            meter = self._meters[line.task] = Steps(self._console, "training", total, self._say)
        meter.update(done, note=note, now=line.timestamp.timestamp() if line.timestamp else None)

    def stop(self) -> None:
        for meter in self._meters.values():
            meter.stop()
        self._meters.clear()
