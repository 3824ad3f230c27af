"""The `make demo` flow, as a test: tiny Gemma 3, synthetic pets, emulator, up, run --follow, results."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_demo_fine_tunes_well_above_the_baseline(tmp_path):
    env = {
        **os.environ,
        "DEMO_DIR": str(tmp_path / "demo"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "created  job" in re.sub(r" +", " ", out).replace("created job", "created  job")
    assert "Everything was already in place: nothing changed." in out
    assert re.search(r"Execution gemma3-finetuning-job-\w+ succeeded: 1/1 tasks succeeded", out)
    baseline, final = map(float, re.search(r"Accuracy\s*│\s*([\d.]+)%\s*│\s*([\d.]+)%", out).groups())
    assert baseline < 15 and final > 50, out[-3000:]
    assert "hf_demo_" not in out + done.stderr
