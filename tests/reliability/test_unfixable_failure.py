"""An error that a retry cannot fix, in the real (tiny) trainer run by the emulated Cloud Run: the first
attempt records it in the execution's run directory, the retry exits at once with the same Error and Hint
(no data or model load), and `run --follow` shows them and exits 2."""

from __future__ import annotations

import json
import re
from pathlib import Path

from launcher.emulator.server import Emulator
from tests.support.image_source import image_source
from tests.support.reliability import cli, emulated
from trainer.offline.synthetic import write_dataset
from trainer.offline.tiny import build

BUCKET = "demo-project-gemma3-finetuning"


def task_lines(emulator: Emulator, execution: str) -> list[tuple[str, str]]:
    """(attempt, text) of every line the execution's task wrote."""
    lines = []
    for raw in (emulator.data_dir / "logging.jsonl").read_text().splitlines():
        entry = json.loads(raw)
        labels = entry.get("labels", {})
        if labels.get("run.googleapis.com/execution_name") == execution and "textPayload" in entry:
            lines.append((labels.get("run.googleapis.com/task_attempt", ""), entry["textPayload"]))
    return lines


def test_an_unreadable_image_fails_once_and_the_retry_exits_at_once_with_its_error(tmp_path: Path):
    project = image_source(tmp_path / "project", ["python", "-m", "trainer"], with_trainer=True)
    build(tmp_path / "tiny-gemma3")
    pets = tmp_path / "oxford-iiit-pet"
    write_dataset(pets, per_class=1, test_per_class=1)
    # Staging copies bytes; only the trainer, which decodes every image it draws, finds this one broken.
    broken = sorted((pets / "images").glob("*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    Path("gemma-launch.toml").write_text(
        'project_id = "demo-project"\n\n[trainer]\ntrain-size = 37\neval-size = 37\nseed = 0\n'
    )
    with emulated(tmp_path) as emulator:
        up = cli(
            "up",
            "--source",
            str(project),
            "--model-source",
            str(tmp_path / "tiny-gemma3"),
            "--dataset-source",
            str(pets),
            "--max-retries",
            "1",
        )
        assert up.exit_code == 0, up.output
        followed = cli("run", "--follow")
        execution = re.search(r"Started execution (\S+)", followed.output)[1]
        lines = task_lines(emulator, execution)
        status = json.loads(cli("status", "--json").output)[0]
        results = cli("results")
        recorded = json.loads((emulator.bucket_dir(BUCKET) / "runs" / execution / "failure.json").read_text())

    assert followed.exit_code == 2, followed.output
    (error,) = [line for line in followed.output.splitlines() if line.startswith("Error:")]
    assert error.startswith(f"Error: Execution {execution} stopped on an error a retry cannot fix: ")
    assert error.endswith(recorded["error"])
    assert broken.name in error
    hint = "Hint: Replace or remove that image in the dataset (and stage the dataset again)."
    assert hint in followed.output
    assert "Traceback" not in followed.output
    assert status["state"] == "Failed" and status["retried"] == 1
    assert results.exit_code == 2
    assert "has no results: the trainer stopped on an error a retry cannot fix: cannot read image" in (
        results.output
    )
    assert recorded["attempt"] == 0 and recorded["error"].startswith("cannot read image ")

    first = [text for attempt, text in lines if attempt == "0"]
    retry = [text for attempt, text in lines if attempt == "1"]
    assert any(text.startswith("Error: cannot read image") for text in first), first
    # The retry read the record and stopped: no platform probe, no data, the first attempt's words.
    assert any("task attempt 1: an earlier attempt stopped on an error" in text for text in retry), retry
    assert not any(" data: " in text or "torch " in text for text in retry), retry
    errors = [[text for text in texts if text.startswith(("Error:", "Hint:"))] for texts in (first, retry)]
    assert errors[0] == errors[1] and len(errors[0]) == 2
