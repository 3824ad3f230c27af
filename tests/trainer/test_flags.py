"""trainer/flags.py: the trainer's flags without torch, and a setting turned into the trainer's arguments."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import flags
from trainer.flags import FlagError, parse_args, setting_argv

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "peft", "trl", "sklearn", "accelerate", "PIL", "numpy")


def test_importing_the_flags_imports_no_training_library() -> None:
    # A fresh interpreter: this one has imported torch long ago.
    code = "import json, sys, trainer.flags; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    loaded = {name.split(".")[0] for name in json.loads(done.stdout)}
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_every_flag_is_named_as_on_the_command_line() -> None:
    names = flags.names()
    assert {"max-memory-gib", "compile", "cache-image-features", "merge", "train-size"} <= set(names)
    assert "help" not in names
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    ("name", "value", "argv"),
    [
        ("learning-rate", "1e-4", ["--learning-rate", "1e-4"]),
        ("train-size", 64, ["--train-size", "64"]),
        ("merge", True, ["--merge"]),
        ("merge", "false", []),
        ("cache-image-features", False, ["--no-cache-image-features"]),
        ("cache-image-features", "true", ["--cache-image-features"]),
        ("compile", "off", ["--compile", "off"]),
        ("gradient-checkpointing", "on", ["--gradient-checkpointing", "on"]),
        ("max-memory-gib", 40, ["--max-memory-gib", "40"]),
        ("batch-size", "auto", ["--batch-size", "auto"]),
    ],
)
def test_a_setting_becomes_the_arguments_the_trainer_parses(name, value, argv) -> None:
    assert setting_argv(name, value) == argv
    parse_args(argv)


@pytest.mark.parametrize(
    ("name", "value", "message", "hint"),
    [
        (
            "learning-rate",
            "abc",
            "must be a positive number, got 'abc'",
            "learning-rate takes a positive number (default 0.0002).",
        ),
        ("compile", "yes", "invalid choice: 'yes'", "compile takes one of auto, on, off (default auto)."),
        ("lora-dropout", 1, "must be in [0, 1), got '1'", "a number from 0 up to (not including) 1"),
        ("merge", "yes", "merge is a switch, got 'yes'", "Give merge true or false."),
        ("train-size", True, "must be a positive integer, got 'true'", "a positive integer (default 3680)"),
        ("learning_rate", "1", "the trainer has no flag --learning_rate", "Did you mean learning-rate?"),
    ],
)
def test_a_setting_the_trainer_would_refuse_is_a_flag_error(name, value, message, hint) -> None:
    with pytest.raises(FlagError) as raised:
        setting_argv(name, value)
    assert message in raised.value.message
    assert hint in raised.value.hint


def test_the_output_dir_of_a_refused_command_line_is_still_found() -> None:
    assert flags.output_dir(["--train-size", "0", "--output-dir", "/mnt/gcs/runs"]) == "/mnt/gcs/runs"
    assert flags.output_dir(["--train-size", "0"]) == "output"
    assert flags.output_dir(["--output-dir"]) is None


def test_finding_the_output_dir_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert flags.output_dir(["--output-dir"]) is None
    assert capsys.readouterr() == ("", "")
