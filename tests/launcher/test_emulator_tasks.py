"""The emulator's task runner: tasks, retries and parallelism as Cloud Run runs them, and its own
failures surfacing as a failed task rather than a task that silently never ends."""

from __future__ import annotations

import sys
from pathlib import Path

from launcher.emulator.tasks import Launch, Outcome, TaskRunner


class Recorded:
    def __init__(self) -> None:
        self.ended: dict[int, tuple[str, Outcome | None]] = {}

    def line(self, index: int, attempt: int, stream: str, text: str) -> None:
        pass

    def attempt_started(self, index: int, attempt: int) -> None:
        pass

    def attempt_ended(self, index: int, attempt: int, outcome: Outcome, will_retry: bool) -> None:
        if index == 1 and will_retry:
            raise OSError("the bucket's directory vanished while it was read")

    def task_ended(self, index: int, state: str, outcome: Outcome | None) -> None:
        self.ended[index] = (state, outcome)


def test_an_error_of_the_emulator_itself_fails_that_task_and_the_others_still_run(tmp_path: Path):
    def launch(index: int, attempt: int) -> Launch:
        code = "raise SystemExit(1)" if index == 1 else "pass"
        return Launch([sys.executable, "-c", code], {}, tmp_path)

    events = Recorded()
    TaskRunner(count=3, parallelism=2, max_retries=1, timeout_s=60, launch=launch, events=events).run()
    assert sorted(events.ended) == [0, 1, 2]
    assert events.ended[0][0] == events.ended[2][0] == "succeeded"
    state, outcome = events.ended[1]
    assert state == "failed" and "emulator error" in outcome.error and "vanished" in outcome.error
