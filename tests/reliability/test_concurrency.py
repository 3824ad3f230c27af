"""Two `up`s at the same time against one project end with one set of resources, and both succeed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.reliability import duplicates, emulated, make_project, up_args

pytestmark = pytest.mark.slow

RUNS = int(os.environ.get("GEMMA_LAUNCH_RELIABILITY_RUNS", "1"))


@pytest.mark.parametrize("run", range(RUNS))
def test_two_ups_at_once_both_succeed_with_one_set_of_resources(run, tmp_path, figures):
    project = make_project(tmp_path / "project")
    with emulated(tmp_path) as emulator:
        command = [sys.executable, "-c", "from launcher.cli import main; main()", *up_args(project)]
        ups = [
            subprocess.Popen(
                command, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outputs = [up.communicate(timeout=300) for up in ups]
        for up, (stdout, stderr) in zip(ups, outputs, strict=True):
            assert up.returncode == 0, stdout + stderr
            assert "Traceback" not in stderr
        assert duplicates(emulator) == []
        jobs = emulator.state.table("run_jobs")
    assert len(jobs) == 1
    figures(concurrent_ups=2, concurrent_duplicates=0)
