"""The process side of the emulated Cloud Run: one execution's tasks as local process groups.

`TaskRunner.run()` blocks until every task has succeeded, failed after its retries or been cancelled.
It knows nothing of protos or state: it asks `launch(index, attempt)` for each attempt's command and
reports everything that happens to `events`, which the Run service turns into resources and logs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

# Cloud Run gives a cancelled task 10 s between SIGTERM and SIGKILL; locally a short grace keeps
# cancellation (and emulator shutdown) quick while still letting a process clean up.
CANCEL_GRACE_S = 2.0


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    cwd: Path


@dataclass(frozen=True)
class Outcome:
    exit_code: int  # the process's exit status, or 0 when it was ended by a signal
    term_signal: int  # the signal that ended it, 0 if it exited by itself
    timed_out: bool = False
    cancelled: bool = False
    error: str = ""  # the process could not be started at all

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.term_signal and not (self.timed_out or self.cancelled)


class Events(Protocol):
    def line(self, index: int, attempt: int, stream: str, text: str) -> None: ...

    def attempt_started(self, index: int, attempt: int) -> None: ...

    def attempt_ended(self, index: int, attempt: int, outcome: Outcome, will_retry: bool) -> None: ...

    def task_ended(self, index: int, state: str, outcome: Outcome | None) -> None:
        """`state` is "succeeded", "failed" or "cancelled" (`outcome` None: it never started)."""
        ...


@dataclass
class _Attempt:
    process: subprocess.Popen[bytes]
    killed: bool = False


@dataclass
class TaskRunner:
    count: int
    # At most this many tasks run at once; 0: as many as possible, here all of them. The next task starts
    # as one ends (https://cloud.google.com/run/docs/configuring/parallelism).
    parallelism: int
    max_retries: int
    timeout_s: float
    launch: Callable[[int, int], Launch]
    events: Events
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: dict[int, _Attempt] = field(default_factory=dict)
    _next: int = 0

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"run-task-worker-{n}", daemon=True)
            for n in range(min(self.parallelism or self.count, self.count))
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    def cancel(self) -> None:
        """Stop every running attempt (SIGTERM, then SIGKILL after a grace) and start no more."""
        self._cancelled.set()
        with self._lock:
            attempts = list(self._running.values())
        for attempt in attempts:
            _signal_group(attempt.process, signal.SIGTERM)
            timer = threading.Timer(CANCEL_GRACE_S, _signal_group, (attempt.process, signal.SIGKILL))
            timer.daemon = True
            timer.start()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def kill(self, index: int) -> bool:
        """SIGKILL the running attempt of task `index`, as a host failure would; False if none runs."""
        with self._lock:
            attempt = self._running.get(index)
            if attempt is None or attempt.process.poll() is not None:
                return False
            attempt.killed = True
        _signal_group(attempt.process, signal.SIGKILL)
        return True

    def _work(self) -> None:
        while True:
            with self._lock:
                index = self._next
                self._next += 1
            if index >= self.count:
                return
            if self.cancelled:
                self.events.task_ended(index, "cancelled", None)
                continue
            try:
                self._run_task(index)
            except Exception as error:
                # The emulator's own failure: the task fails saying so, instead of vanishing with its thread
                # and leaving the execution to end as if it had never been one of its tasks.
                self.events.task_ended(index, "failed", Outcome(1, 0, error=f"emulator error: {error!r}"))

    def _run_task(self, index: int) -> None:
        attempt = 0
        while True:
            self.events.attempt_started(index, attempt)
            outcome = self._run_attempt(index, attempt)
            if outcome.succeeded:
                self.events.attempt_ended(index, attempt, outcome, will_retry=False)
                self.events.task_ended(index, "succeeded", outcome)
                return
            if outcome.cancelled:
                self.events.attempt_ended(index, attempt, outcome, will_retry=False)
                self.events.task_ended(index, "cancelled", outcome)
                return
            will_retry = attempt < self.max_retries and not self.cancelled
            self.events.attempt_ended(index, attempt, outcome, will_retry=will_retry)
            if not will_retry:
                self.events.task_ended(index, "cancelled" if self.cancelled else "failed", outcome)
                return
            attempt += 1

    def _run_attempt(self, index: int, attempt_number: int) -> Outcome:
        try:
            launch = self.launch(index, attempt_number)
            process = subprocess.Popen(
                launch.argv,
                cwd=launch.cwd,
                env=launch.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # A process group of its own, so a timeout or cancel also ends what the task spawned.
                start_new_session=True,
            )
        except (OSError, ValueError) as error:
            return Outcome(exit_code=127, term_signal=0, error=str(error))
        attempt = _Attempt(process)
        with self._lock:
            self._running[index] = attempt
        if self.cancelled:  # cancelled between the check in _work and the registration above
            _signal_group(process, signal.SIGKILL)
        readers = [
            threading.Thread(
                target=self._pump, args=(stream, name, index, attempt_number), daemon=True, name=f"run-{name}"
            )
            for stream, name in ((process.stdout, "stdout"), (process.stderr, "stderr"))
        ]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            process.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process, signal.SIGKILL)
            process.wait()
        for reader in readers:
            # Bounded: a daemon the task left behind (in a session of its own) may hold the pipe open.
            reader.join(timeout=10)
        with self._lock:
            self._running.pop(index, None)
        code = process.returncode
        return Outcome(
            exit_code=max(code, 0),
            term_signal=-code if code < 0 else 0,
            timed_out=timed_out,
            cancelled=self.cancelled and code != 0 and not attempt.killed and not timed_out,
        )

    def _pump(self, stream: IO[bytes] | None, name: str, index: int, attempt: int) -> None:
        assert stream is not None
        with stream:
            for raw in stream:
                self.events.line(index, attempt, name, raw.decode("utf-8", "replace").rstrip("\r\n"))


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)
