"""Flags: bad values end with one `Error:` and one `Hint:` line and exit 2 before any weights load; --dry-run
loads none."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main, parse_args
from trainer.data import load_pets


@pytest.fixture(scope="session")
def broken_pets(synthetic_pets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small set in the official layout where one test image is not an image."""
    path = tmp_path_factory.mktemp("broken-pets") / "pets"
    shutil.copytree(synthetic_pets(1, 1), path)
    (path / "images" / "pug_2.jpg").write_bytes(b"not a jpeg")
    return path


@pytest.fixture(scope="session")
def not_a_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("not-a-dataset")
    (path / "images").mkdir()
    return path


BAD_FLAGS = [
    (["--train-size", "0"], "argument --train-size: must be a positive integer, got '0'"),
    (["--eval-size", "-5"], "argument --eval-size: must be a positive integer"),
    (["--train-size", "many"], "argument --train-size: must be a positive integer, got 'many'"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--num-epochs", "0"], "argument --num-epochs: must be a positive number"),
    (["--learning-rate", "nan"], "argument --learning-rate: must be a positive number"),
    (["--lora-dropout", "1.5"], "argument --lora-dropout: must be in [0, 1)"),
    (["--quantization", "8bit"], "argument --quantization: invalid choice: '8bit'"),
    (["--eval-method", "vote"], "argument --eval-method: invalid choice: 'vote'"),
    (["--checkpoint-strategy", "hourly"], "argument --checkpoint-strategy: invalid choice"),
    (["--gcs-output-path", "my-bucket/out"], "argument --gcs-output-path: must look like gs://BUCKET"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--model-id", "{tmp}/missing-model"], "model directory {tmp}/missing-model does not exist"),
    (["--dataset", "{tmp}/missing-pets"], "dataset directory {tmp}/missing-pets does not exist"),
    (["--dataset", "{not_a_dataset}"], "has neither annotations/list.txt"),
    (["--eval-size", "500"], "--eval-size 500 is larger than the split it is drawn from (222 images)"),
    (["--train-size", "800"], "--train-size 800 is larger than the split it is drawn from (740 images)"),
    (["--dataset", "{broken_pets}", "--train-size", "37", "--eval-size", "37"], "cannot read image"),
    (["--quantization", "4bit"], "--quantization 4bit needs a CUDA GPU"),
    ([], "cannot load the model weights of {weightless_model}"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_an_error_and_a_hint(
    flags: list[str],
    message: str,
    weightless_model: Path,
    pets: Path,
    broken_pets: Path,
    not_a_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    paths = {
        "tmp": tmp_path,
        "broken_pets": broken_pets,
        "not_a_dataset": not_a_dataset,
        "weightless_model": weightless_model,
    }
    flags = [flag.format(**paths) for flag in flags]
    # The weightless model makes an attempt to load weights fail with its own message (the last case).
    base = ["--model-id", str(weightless_model), "--dataset", str(pets), "--device", "cpu"]
    base += ["--train-size", "740", "--eval-size", "100", "--output-dir", str(tmp_path / "out")]
    try:
        code = main([*base, *flags])
    except SystemExit as exit_:
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    error, hint = lines
    assert error.startswith("Error: ") and hint.startswith("Hint: "), stderr
    assert message.format(**paths) in error
    # Nothing written: at most the empty output directory, which the trainer creates before loading data.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_without_a_gpu(
    weightless_model: Path, pets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--model-id", str(weightless_model), "--dataset", str(pets), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.startswith("Error: --device cuda: no CUDA GPU is visible\nHint: ")


@pytest.mark.slow
def test_command_line_error_is_an_error_and_a_hint_without_traceback(trainer_cli) -> None:
    result = trainer_cli(["--train-size", "0"])
    assert result.returncode == 2
    assert result.stderr == (
        "Error: argument --train-size: must be a positive integer, got '0'\n"
        "Hint: --train-size takes a positive integer (default 3680).\n"
    )


@pytest.mark.parametrize(
    ("flags", "hint"),
    [
        (["--epochs", "3"], "Hint: Did you mean --num-epochs? `python -m trainer --help` lists every flag."),
        (["--compile", "yes"], "Hint: --compile takes one of auto, on, off (default auto)."),
        (["--lora-dropout", "1"], "Hint: --lora-dropout takes a number from 0 up to (not including) 1"),
        (["--eval-size", "500"], "Hint: Use --eval-size 222 or less."),
    ],
)
def test_the_hint_says_what_the_flag_takes(
    flags: list[str], hint: str, weightless_model: Path, pets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model-id", str(weightless_model), "--dataset", str(pets), "--device", "cpu", "--dry-run"]
    assert main([*base, "--train-size", "74", *flags]) == 2
    assert hint in capsys.readouterr().err.splitlines()[1]


@pytest.mark.slow
def test_dry_run_formats_data_without_loading_weights(
    trainer_cli, weightless_model: Path, pets: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["--model-id", str(weightless_model), "--dataset", str(pets), "--output-dir", str(out)]
    result = trainer_cli([*args, "--train-size", "74", "--eval-size", "37", "--dry-run"])
    assert result.returncode == 0, result.stderr
    assert "data: 74 train / 37 eval images, 37 breeds" in result.stdout
    assert "answer (the only labelled tokens): 'Abyssinian<end_of_turn>'" in result.stdout
    assert "'pixel_values': (1, 3, 32, 32)" in result.stdout
    assert "dry run: data formatted, no weights loaded" in result.stdout
    assert not out.exists()


@pytest.mark.slow
def test_module_commands_write_a_loadable_model_and_dataset(trainer_cli, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    for command, said in (
        (["trainer.offline.tiny", str(tmp_path / "m")], f"wrote a tiny Gemma 3 to {tmp_path / 'm'}\n"),
        (
            ["trainer.offline.synthetic", str(tmp_path / "d"), "--per-class", "2", "--test-per-class", "1"],
            f"wrote 111 images to {tmp_path / 'd'}\n",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", *command], cwd=repo, check=True, capture_output=True, text=True
        )
        # Off a terminal: the one line, no blank lines or progress bars.
        assert (done.stdout, done.stderr) == (said, "")
    data = load_pets(str(tmp_path / "d"), 74, 37, seed=0)
    assert (len(data.train), len(data.test)) == (74, 37)
    result = trainer_cli(
        [
            "--model-id",
            str(tmp_path / "m"),
            "--dataset",
            str(tmp_path / "d"),
            "--train-size",
            "74",
            "--eval-size",
            "37",
            "--dry-run",
        ]
    )
    assert result.returncode == 0, result.stderr


# This machine has no GPU to fill: the step named raises what PyTorch raises when one is full.
FULL_GPU = (
    "CUDA out of memory. Tried to allocate 1.05 GiB. GPU 0 has a total capacity of 22.03 GiB of which 512.00 "
    "MiB is free. Of the allocated memory 20.4 GiB is allocated by PyTorch"
)


def test_running_out_of_gpu_memory_while_loading_names_the_pass_and_the_weights_flag(
    weightless_model: Path, pets: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def load_model_on_a_full_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError(FULL_GPU)

    monkeypatch.setattr("trainer.__main__.load_model", load_model_on_a_full_gpu)
    flags = ["--model-id", str(weightless_model), "--dataset", str(pets), "--device", "cpu"]
    flags += ["--train-size", "74", "--eval-size", "37", "--output-dir", str(tmp_path)]
    flags += ["--batch-size", "24", "--max-memory-gib", "40"]
    assert main(flags) == 2
    assert capsys.readouterr().err == (
        "Error: the GPU ran out of memory in loading the model (CUDA out of memory. Tried to allocate 1.05 "
        "GiB) within --max-memory-gib 40.\n"
        "Hint: Use --quantization int8 or 4bit (now auto).\n"
    )


def test_running_out_of_gpu_memory_in_the_image_feature_pass_names_it_and_the_eval_batch(
    tiny_model: Path, pets: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 21's failure: 27B's 4-bit weights in 22 GiB, 16 images of 4,096 patches through SigLIP."""

    def features_on_a_full_gpu(backbone, pixels):
        raise torch.OutOfMemoryError(FULL_GPU)

    monkeypatch.setattr("trainer.speed.features.image_features", features_on_a_full_gpu)
    flags = ["--model-id", str(tiny_model), "--dataset", str(pets), "--device", "cpu"]
    flags += ["--train-size", "37", "--eval-size", "37", "--output-dir", str(tmp_path)]
    flags += ["--max-memory-gib", "22", "--quantization", "int8"]
    assert main(flags) == 2
    error, hint = capsys.readouterr().err.splitlines()
    assert error == (
        "Error: the GPU ran out of memory in the image-feature pass (CUDA out of memory. Tried to allocate "
        "1.05 GiB) within --max-memory-gib 22."
    )
    assert hint == ("Hint: Use a smaller --eval-batch-size (now 16), or --quantization 4bit (now int8).")


def test_help_shows_every_default(trainer_cli) -> None:
    result = trainer_cli(["--help"])
    assert result.returncode == 0, result.stderr
    # Each option's entry runs from its flag to the next option's; the help wraps to the terminal width.
    # (A group's description may start a line with a flag too: the option's own entry comes first.)
    entries: dict[str, str] = {}
    for entry in re.split(r"\n  (?=--)", result.stdout):
        entries.setdefault(entry.split()[0].rstrip(","), " ".join(entry.split()))
    defaults = {**vars(parse_args([])), "batch_size": "auto"}
    shown = [key for key, value in defaults.items() if value not in (None, False)]
    assert len(shown) > 20
    for key in shown:
        flag = "--" + key.replace("_", "-")
        assert f"(default: {defaults[key]})" in entries[flag], entries[flag]
