"""Ctrl-C (SIGINT) at any moment of `up` leaves a state that the next `up` completes, with no duplicates.

Each run interrupts a fresh `up` after a different delay, spread over the whole command (provisioning,
the source upload, the build and the job); GEMMA_LAUNCH_RELIABILITY_RUNS scales how many (the bench
runs more).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.support.reliability import cli, duplicates, emulated, make_project, up_args

pytestmark = pytest.mark.slow

RUNS = 2 * int(os.environ.get("GEMMA_LAUNCH_RELIABILITY_RUNS", "1"))
# `up` here takes about 5.5 s, the first 2.5 of them importing; a later SIGINT would find it done.
DELAYS = [round(random.Random(run).uniform(2.0, 5.5), 2) for run in range(RUNS)]


@pytest.mark.parametrize("delay", DELAYS)
def test_sigint_during_up_then_up_again_completes(delay, tmp_path, figures):
    project = make_project(tmp_path / "project")
    with emulated(tmp_path) as emulator:
        interrupted = subprocess.Popen(
            [sys.executable, "-c", "from launcher.cli import main; main()", *up_args(project)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell's background job starts with SIGINT ignored, and Python keeps it so: undo that.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(delay)
        interrupted.send_signal(signal.SIGINT)
        stdout, stderr = interrupted.communicate(timeout=120)
        finished_anyway = interrupted.returncode == 0
        # Known, reported: gRPC's core sometimes aborts the process (SIGABRT, "epoll_wait error: Bad
        # file descriptor") while Python unwinds the KeyboardInterrupt; the state is what matters here.
        grpc_abort = interrupted.returncode == -signal.SIGABRT
        if not finished_anyway and not grpc_abort:
            assert interrupted.returncode in (1, 130, -signal.SIGINT), stderr[-2000:]
            if interrupted.returncode == 1:  # click caught it: "Aborted!", no traceback
                assert "Aborted!" in stderr and "Traceback" not in stderr, stderr[-3000:]
        again = cli(*up_args(project))
        assert again.exit_code == 0, again.output
        assert duplicates(emulator) == []
        assert cli(*up_args(project)).output.count("unchanged") >= 7
    figures(
        interrupts=1,
        interrupted_before_the_end=int(not finished_anyway),
        interrupt_grpc_aborts=int(grpc_abort),
        interrupt_failures=0,
    )
