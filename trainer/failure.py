"""A failure that a retry cannot fix, recorded in the run directory for the task's later attempts.

Cloud Run retries a failed task up to the job's max retries, each attempt a new container on a GPU. When
an attempt stops on a UserError that recurs (a bad flag, sizes larger than the dataset's splits, a missing
or unreadable file), it writes FILE in the execution's run directory (on the bucket mount); a later attempt
(CLOUD_RUN_TASK_ATTEMPT above 0) finds it and exits at once with the same Error and Hint instead of
loading the model again. gemma-launch reads the same file to show that Error and Hint once the execution
has failed (launcher/job.py, recorded_failure).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from trainer import UserError

FILE = "failure.json"

log = logging.getLogger("trainer")


def report(error: UserError) -> None:
    print(f"Error: {error.message}", file=sys.stderr, flush=True)
    if error.hint:
        print(f"Hint: {error.hint}", file=sys.stderr, flush=True)


def record(run_dir: Path, error: UserError, attempt: int) -> None:
    """Write FILE (whole, then renamed); a run directory that cannot be written records nothing."""
    document = {"error": error.message, "hint": error.hint, "attempt": attempt}
    partial = run_dir / f"{FILE}.partial"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(document, indent=1) + "\n")
        os.replace(partial, run_dir / FILE)
    except OSError as problem:
        log.warning("could not record the failure in %s: %s", run_dir, problem)


def recorded(run_dir: Path) -> UserError | None:
    """The failure an earlier attempt recorded in `run_dir`, or None."""
    try:
        document = json.loads((run_dir / FILE).read_text())
        return UserError(str(document["error"]), str(document.get("hint") or ""))
    except (OSError, ValueError, KeyError, TypeError):
        return None
