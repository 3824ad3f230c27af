"""The `make demo` flow, as a test: tiny Gemma 3, synthetic pets, emulator, up, run --follow, results."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.readme_blocks import readme_blocks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def table(text: str) -> list[str]:
    """The last table's rows (its title names the execution, which differs from run to run)."""
    lines = text.splitlines()
    start = max(n for n, line in enumerate(lines) if line.startswith("┏"))
    end = next(n for n in range(start, len(lines)) if lines[n].startswith("└"))
    return [line.rstrip() for line in lines[start : end + 1]]


def test_demo_fine_tunes_well_above_the_baseline(tmp_path):
    env = {
        **os.environ,
        "DEMO_DIR": str(tmp_path / "demo"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    # A session of its own, ended as a whole whatever stops the test (its timeout, pytest-timeout,
    # Ctrl-C): killing only bash would leave the demo's emulator and its training task running.
    demo = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "demo.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = demo.communicate(timeout=900)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)  # the emulator ends its tasks on SIGTERM
            try:
                demo.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.communicate()
    done = subprocess.CompletedProcess(demo.args, demo.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "created  job" in re.sub(r" +", " ", out).replace("created job", "created  job")
    assert "Everything was already in place: nothing changed." in out
    assert re.search(r"Execution gemma3-finetuning-job-\w+ succeeded: 1/1 tasks succeeded", out)
    baseline, final = map(float, re.search(r"Accuracy\s*│\s*([\d.]+)%\s*│\s*([\d.]+)%", out).groups())
    assert baseline < 15 and final > 50, out[-3000:]
    assert "hf_demo_" not in out + done.stderr
    # The rehearsal leaves nothing behind but the bucket, which holds the results.
    assert re.search(r"deleted\s+job\s+projects/demo-project/", out)
    assert re.search(r"kept\s+bucket\s+gs://", out)
    # Output a person reads: each long step summarised (staging, build, training), no library noise.
    shown = (out + done.stderr).splitlines()
    assert len(shown) < 150, f"{len(shown)} lines:\n" + "\n".join(shown)
    for noise in (
        "uploaded ",
        "Step #",
        "FutureWarning",
        "non_blocking",
        "cloud.google.com/cloud-build",
        "\r",
    ):
        assert noise not in out + done.stderr, noise
    assert len(re.findall(r"\] training: step \d+/235 \(\d+%\)", out)) == 4  # a line per quarter
    assert "Resource not found" not in (tmp_path / "demo" / "emulator.log").read_text()
    # The run is deterministic: README.md shows the table this run prints.
    blocks = readme_blocks((REPO / "README.md").read_text())
    (readme_table,) = [block for block in blocks if block.kind == "demo-output"]
    assert table(readme_table.text) == table(out), "README.md's demo table is out of date: paste the new one"
    # It ends with the run's report page, the same one the trainer wrote, whose path `results` printed.
    written = re.search(r"Wrote (report-gemma3-finetuning-job-\w+\.html) \(\d+\.\d KB\)\.", out)
    assert written, out[-2000:]
    trainers = Path(re.search(r"^report +(\S+report\.html)$", out, re.MULTILINE)[1])
    assert trainers.read_text() == (tmp_path / "demo" / written[1]).read_text()
