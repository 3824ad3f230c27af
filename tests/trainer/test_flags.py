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


def test_each_sweep_task_parses_its_own_combination_after_the_shared_arguments() -> None:
    from trainer import sweep

    argv = [
        "--learning-rate",
        "1e-3",
        "--sweep-grid",
        "learning-rate=1e-4,2e-4,5e-4;lora-r=8,16;merge=false,true",
    ]
    args = parse_args(argv)
    picked = [sweep.for_task(args, argv, {"CLOUD_RUN_TASK_INDEX": str(index)}) for index in range(12)]
    assert [index for _, index in picked] == list(range(12))
    # itertools.product's order: the last key varies fastest.
    assert [(task.learning_rate, task.lora_r, task.merge) for task, _ in picked[:4]] == [
        (1e-4, 8, False),
        (1e-4, 8, True),
        (1e-4, 16, False),
        (1e-4, 16, True),
    ]
    assert (picked[11][0].learning_rate, picked[11][0].lora_r) == (5e-4, 16)
    with pytest.raises(FlagError, match="task 12 has no combination: the sweep grid has 12"):
        sweep.for_task(args, argv, {"CLOUD_RUN_TASK_INDEX": "12"})
    assert sweep.for_task(parse_args([]), [], {"CLOUD_RUN_TASK_INDEX": "3"}) == (parse_args([]), None)


def test_a_grid_turns_off_a_switch_the_executions_arguments_turned_on() -> None:
    from trainer import sweep

    # A job written with `merge = true` under [trainer] carries --merge; the grid's false must win.
    argv = ["--merge", "--lora-r", "4", "--sweep-grid", "merge=true,false;lora-r=8"]
    args = parse_args(argv)
    tasks = [sweep.for_task(args, argv, {"CLOUD_RUN_TASK_INDEX": str(index)})[0] for index in range(2)]
    assert [(task.merge, task.lora_r) for task in tasks] == [(True, 8), (False, 8)]
    assert "--merge" not in sweep.task_argv(argv, {"merge": "false", "lora-r": "8"})


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("lora-r=8,abc", "argument --sweep-grid: lora-r=abc: must be a positive integer, got 'abc'"),
        ("lora-r=8;lora-r=16", "argument --sweep-grid: lora-r is given twice"),
        ("lora-r", "argument --sweep-grid: 'lora-r' is not KEY=VALUE,VALUE..."),
        ("lora_r=8", "argument --sweep-grid: lora_r=8: the trainer has no flag --lora_r"),
        ("sweep-grid=a", "argument --sweep-grid: a grid cannot set sweep-grid"),
    ],
)
def test_the_trainer_refuses_a_grid_it_cannot_run(grid: str, message: str) -> None:
    with pytest.raises(FlagError) as refused:
        parse_args(["--sweep-grid", grid])
    assert refused.value.message == message
    assert refused.value.hint == "--sweep-grid takes KEY=VALUE,VALUE;KEY=VALUE,... over the trainer's flags."
