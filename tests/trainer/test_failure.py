"""An error that a retry cannot fix is recorded by the attempt that meets it; later attempts of the task
exit at once with the same Error and Hint, without loading data or weights."""

import json
import logging
from pathlib import Path

import pytest

from trainer.__main__ import main

EXECUTION = "job-abc12"


def never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was reached")

    return fail


@pytest.fixture
def attempt(monkeypatch):
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", EXECUTION)

    def set_attempt(number: int) -> None:
        monkeypatch.setenv("CLOUD_RUN_TASK_ATTEMPT", str(number))

    return set_attempt


def base(model: Path, pets: Path, out: Path) -> list[str]:
    return ["--model-id", str(model), "--dataset", str(pets), "--device", "cpu", "--output-dir", str(out)]


def test_a_size_too_large_is_recorded_and_the_retry_exits_at_once_with_it(
    weightless_model, pets, tmp_path, attempt, monkeypatch, capsys, caplog
) -> None:
    argv = [*base(weightless_model, pets, tmp_path), "--train-size", "74", "--eval-size", "500"]
    attempt(0)
    assert main(argv) == 2
    first = capsys.readouterr().err
    assert first == (
        "Error: --eval-size 500 is larger than the split it is drawn from (222 images)\n"
        "Hint: Use --eval-size 222 or less.\n"
    )
    recorded = json.loads((tmp_path / EXECUTION / "failure.json").read_text())
    assert recorded == {
        "error": "--eval-size 500 is larger than the split it is drawn from (222 images)",
        "hint": "Use --eval-size 222 or less.",
        "attempt": 0,
    }

    attempt(1)
    monkeypatch.setattr("trainer.__main__.describe_platform", never("the platform probe"))
    monkeypatch.setattr("trainer.__main__.load_pets", never("the data load"))
    monkeypatch.setattr("trainer.__main__.load_model", never("the model load"))
    caplog.set_level(logging.INFO)
    assert main(argv) == 2
    assert capsys.readouterr().err == first
    assert "task attempt 1: an earlier attempt stopped on an error that a retry cannot fix" in caplog.text


def test_a_refused_flag_is_recorded_in_the_run_directory_too(
    weightless_model, pets, tmp_path, attempt, capsys
) -> None:
    attempt(0)
    assert main([*base(weightless_model, pets, tmp_path), "--learning-rate", "abc"]) == 2
    recorded = json.loads((tmp_path / EXECUTION / "failure.json").read_text())
    assert recorded["error"] == "argument --learning-rate: must be a positive number, got 'abc'"
    assert recorded["hint"] == "--learning-rate takes a positive number (default 0.0002)."


def test_the_first_attempt_and_runs_outside_cloud_run_never_read_or_write_a_record(
    weightless_model, pets, tmp_path, attempt, monkeypatch, capsys
) -> None:
    # A stale record from an earlier use of the directory: attempt 0 is a new start.
    run_dir = tmp_path / EXECUTION
    run_dir.mkdir()
    (run_dir / "failure.json").write_text(json.dumps({"error": "stale", "hint": "stale"}))
    attempt(0)
    argv = [*base(weightless_model, pets, tmp_path), "--train-size", "74", "--eval-size", "37", "--dry-run"]
    assert main(argv) == 0
    assert "stale" not in capsys.readouterr().err

    monkeypatch.delenv("CLOUD_RUN_EXECUTION")
    local = tmp_path / "local"
    assert main([*base(weightless_model, pets, local), "--eval-size", "500"]) == 2
    assert not (local / "failure.json").exists()


def test_an_error_another_host_may_not_have_is_not_recorded(
    weightless_model, pets, tmp_path, attempt, monkeypatch, capsys
) -> None:
    # No GPU visible: a driver mismatch recurs, a broken host does not; the retry must try.
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    attempt(0)
    argv = base(weightless_model, pets, tmp_path)
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 2
    assert "Error: --device cuda: no CUDA GPU is visible" in capsys.readouterr().err
    assert not (tmp_path / EXECUTION / "failure.json").exists()
