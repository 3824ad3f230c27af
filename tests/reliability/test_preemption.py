"""Preemption: the emulated Cloud Run SIGKILLs the real (tiny) trainer's task after a checkpoint, as GPU
host maintenance does; the retry resumes from the checkpoint, the execution succeeds, and its metrics
equal an uninterrupted execution's with the same seed. Each execution writes under its own prefix.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from launcher.emulator.server import Emulator
from tests.support.image_source import image_source
from tests.support.reliability import cli, emulated

pytestmark = pytest.mark.slow

SAVE_STEPS = 3
# 74 images, batch 8, 2 epochs: 20 steps, a checkpoint every 3.
TRAINER = {
    "train-size": 74,
    "eval-size": 37,
    "num-epochs": 2,
    "learning-rate": 1e-2,
    "batch-size": 8,
    "eval-batch-size": 37,
    "save-steps": SAVE_STEPS,
    "logging-steps": 1,
    "seed": 0,
    "eval-method": "score",
}


@pytest.fixture
def trainer_project(tmp_path: Path) -> Path:
    """The real trainer package behind a Dockerfile whose entrypoint is `python -m trainer`."""
    return image_source(tmp_path / "project", ["python", "-m", "trainer"], with_trainer=True)


def wait_for(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def task_lines(emulator: Emulator, execution: str) -> list[tuple[str, str]]:
    """(attempt, text) of every log line the execution's task wrote."""
    lines = []
    path = emulator.data_dir / "logging.jsonl"
    for raw in path.read_text().splitlines():
        entry = json.loads(raw)
        labels = entry.get("labels", {})
        if labels.get("run.googleapis.com/execution_name") == execution and "textPayload" in entry:
            lines.append((labels.get("run.googleapis.com/task_attempt", ""), entry["textPayload"]))
    return lines


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(
        int(path.name.rsplit("-", 1)[1])
        for path in run_dir.glob("checkpoint-*")
        if (path / "trainer_state.json").is_file()
    )


def test_a_killed_task_resumes_and_ends_like_an_uninterrupted_run(
    tmp_path, trainer_project, tiny_model, few_pets, figures
):
    Path("gemma-launch.toml").write_text(
        'project_id = "demo-project"\n\n[trainer]\n'
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in TRAINER.items())
    )
    with emulated(tmp_path) as emulator:
        up = cli(
            "up",
            "--source",
            str(trainer_project),
            "--model-source",
            str(tiny_model),
            "--dataset-source",
            str(few_pets),
            "--max-retries",
            "2",
        )
        assert up.exit_code == 0, up.output
        runs = emulator.bucket_dir("demo-project-gemma3-finetuning") / "runs"
        service = emulator.services["run"]

        started = cli("run")
        assert started.exit_code == 0, started.output
        killed = re.search(r"Started execution (\S+)", started.output)[1]
        wait_for(lambda: complete_checkpoints(runs / killed), "a first checkpoint")
        # A random moment after a checkpoint, as maintenance does not wait for one.
        time.sleep(random.Random(0).uniform(0.0, 0.5))
        assert service.kill_task(killed, 0)
        followed = cli("logs", killed, "--follow")
        assert followed.exit_code == 0, followed.output

        reference_run = cli("run", "--follow")
        assert reference_run.exit_code == 0, reference_run.output
        reference = re.search(r"Started execution (\S+)", reference_run.output)[1]

        status = {row["execution"]: row for row in json.loads(cli("status", "--json").output)}
        lines = task_lines(emulator, killed)
        latest = (runs / "LATEST").read_text().strip()
        killed_results = json.loads(cli("results", killed, "--json").output)
        reference_results = json.loads(cli("results", reference, "--json").output)

    assert status[killed]["state"] == "Succeeded" and status[killed]["retried"] == 1
    assert status[reference]["retried"] == 0
    assert killed_results["task_attempt"] == 1 and killed_results["execution"] == killed
    assert reference_results["task_attempt"] == 0 and reference_results["execution"] == reference
    # Same seed, same data: the resumed run's evaluation is the uninterrupted run's, exactly.
    for key in ("baseline", "final", "per_class", "by_method"):
        assert killed_results[key] == reference_results[key], key
    assert killed_results["train"]["steps"] == reference_results["train"]["steps"] == 20

    first_attempt_steps = [
        int(match[1])
        for attempt, text in lines
        if attempt == "0" and (match := re.search(r" step (\d+)/", text))
    ]
    resumed = [text for attempt, text in lines if attempt == "1" and "task attempt 1: resuming from" in text]
    assert len(resumed) == 1, lines[-20:]
    resumed_at = int(re.search(r"checkpoint-(\d+)", resumed[0])[1])
    steps_lost = max(first_attempt_steps, default=0) - resumed_at
    assert 0 <= steps_lost <= SAVE_STEPS

    # Each execution kept its own outputs; LATEST names the newest.
    assert (runs / killed / "results.json").is_file() and (runs / reference / "results.json").is_file()
    assert latest == reference
    figures(kills=1, kills_survived=1, steps_lost=[steps_lost], save_steps=SAVE_STEPS)
