"""The container as Cloud Run runs it: write first, the compile preflight, /dev/shm, retries that resume."""

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainer.__main__ as trainer_main
from trainer.__main__ import main
from trainer.container import SharedMemory, compile_toolchain_problem, describe_platform

REPO = Path(__file__).resolve().parents[2]
MIB = 2**20


def never(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} was reached")

    return fail


def test_unwritable_output_dir_fails_before_anything_loads(
    weightless_model: Path, pets: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tests run as root, whom permissions do not stop: a file where a directory should be does.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setattr("trainer.__main__.load_pets", never("the data load"))
    monkeypatch.setattr("trainer.__main__.load_model", never("the model load"))
    flags = ["--model-id", str(weightless_model), "--dataset", str(pets), "--device", "cpu"]
    assert main([*flags, "--output-dir", str(blocker / "runs")]) == 2
    error, hint = capsys.readouterr().err.splitlines()
    assert error == f"Error: cannot write to the output directory {blocker / 'runs'}: Not a directory"
    assert hint.startswith(f"Hint: give --output-dir a directory that this user (uid {os.getuid()}) can")


def test_compile_preflight_finds_no_compiler_where_triton_looks() -> None:
    assert compile_toolchain_problem({"CC": "/nonexistent/cc", "PATH": ""}) == (
        "CC is '/nonexistent/cc', which is not an executable C compiler"
    )
    assert compile_toolchain_problem({"PATH": ""}) == (
        "no C compiler: CC is not set and neither gcc nor clang is on PATH"
    )


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc on PATH")
def test_compile_preflight_builds_a_python_module_with_the_compiler_it_finds() -> None:
    problem = compile_toolchain_problem({"PATH": os.environ["PATH"]})
    # Compiler, headers and the test build pass; only a GPU machine has the driver's libcuda.
    assert problem is None or problem.startswith("the host driver's libcuda.so.1 is not visible")
    # A compiler that cannot build (here: one that always fails) is found out by the test build.
    failing = compile_toolchain_problem({"PATH": os.environ["PATH"], "CC": "false"})
    assert failing.startswith(f"{shutil.which('false')} cannot build a Python extension")


@pytest.fixture
def on_a_gpu_without_compiler(monkeypatch) -> list[str]:
    """A CUDA device as the trainer sees it, with no C compiler on PATH; the model load stops the run."""
    monkeypatch.setattr("trainer.__main__.resolve_device", lambda device: "cuda")
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CC", raising=False)
    reached = []

    def load_model(*args, **kwargs):
        reached.append("load_model")
        raise trainer_main.UserError("stopped at the model load")

    monkeypatch.setattr("trainer.__main__.load_model", load_model)
    return reached


def test_compile_on_without_a_compiler_is_an_error_before_the_model_loads(
    on_a_gpu_without_compiler: list[str],
    weightless_model: Path,
    pets: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["--model-id", str(weightless_model), "--dataset", str(pets), "--output-dir", str(tmp_path)]
    assert main([*flags, "--compile", "on", "--quantization", "none"]) == 2
    error, hint = capsys.readouterr().err.splitlines()
    assert error == (
        "Error: --compile on: torch.compile cannot run here: no C compiler: CC is not set and neither gcc "
        "nor clang is on PATH"
    )
    assert hint.startswith("Hint: the image needs gcc (or $CC), the Python headers")
    assert on_a_gpu_without_compiler == []


def test_compile_auto_without_a_compiler_goes_on_without_compiling(
    on_a_gpu_without_compiler: list[str],
    weightless_model: Path,
    pets: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["--model-id", str(weightless_model), "--dataset", str(pets), "--output-dir", str(tmp_path)]
    flags += ["--train-size", "74", "--eval-size", "37", "--quantization", "none"]
    caplog.set_level(logging.INFO)
    assert main(flags) == 2
    assert capsys.readouterr().err == "Error: stopped at the model load\n"
    assert on_a_gpu_without_compiler == ["load_model"]
    # The first line names what the run found: torch, its CUDA, the driver, the GPU.
    assert caplog.records[0].message.startswith(f"torch {torch.__version__} (CUDA ")
    assert "torch.compile cannot run here (no C compiler: CC is not set" in caplog.text
    assert "training without it" in caplog.text


@pytest.mark.parametrize(
    ("module", "driver"),
    [
        # The open kernel module, the only one for Blackwell (RTX PRO 6000), and the proprietary one (L4).
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  Release Build  "
            "(dvs-builder@U22-I3-AE18-23-3)  Tue Sep 23 09:55:41 UTC 2025",
            "580.95.05",
        ),
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.216.03  Wed Oct 23 17:48:46 UTC 2024",
            "535.216.03",
        ),
    ],
)
def test_first_log_line_names_torch_its_cuda_and_the_driver_found(
    tmp_path: Path, module: str, driver: str
) -> None:
    # /proc/driver/nvidia/version as the driver writes it.
    version = tmp_path / "version"
    version.write_text(f"{module}\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
    line = describe_platform(version)
    assert line.startswith(
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), NVIDIA driver {driver}, "
    )
    assert line.endswith(f", Python {platform.python_version()}")
    # No driver: said so, not guessed.
    assert ", NVIDIA driver none, no GPU visible, " in describe_platform(tmp_path / "missing")


def test_workers_and_their_prefetched_batches_fit_dev_shm(caplog: pytest.LogCaptureFixture) -> None:
    batch = 16 * 3 * 896 * 896 * 4  # 16 images of 896 px in float32: 147 MiB
    # Docker's default 64 MiB: not even one batch fits, so the main process decodes the images.
    assert SharedMemory(64 * MIB).workers(8, batch, "evaluation batches") == 0
    assert (
        "/dev/shm has 0.06 GiB free: 0 data-loader workers instead of 8 for evaluation batches "
        "(2 batches of 147 MiB in flight per worker)"
    ) in caplog.text
    # 2 GiB: half of it holds 3 workers' 2 batches each.
    assert SharedMemory(2048 * MIB).workers(8, batch, "evaluation batches") == 3
    caplog.clear()
    assert SharedMemory(16 * 2**30).workers(8, batch, "evaluation batches") == 8
    assert caplog.text == ""


def test_shared_memory_is_measured_where_asked(tmp_path: Path) -> None:
    assert SharedMemory.measure(str(tmp_path)).free == shutil.disk_usage(tmp_path).free
    assert SharedMemory.measure(str(tmp_path / "missing")).free == 0


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_retry_reuses_baseline_and_batch(
    tiny_model: Path, pets: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    execution = "trainer-job-sigterm"
    run_dir = tmp_path / execution
    # --batch-size auto is 8 on CPU: 10 epochs of 10 steps.
    flags = ["--model-id", str(tiny_model), "--dataset", str(pets), "--output-dir", str(tmp_path)]
    flags += ["--train-size", "74", "--eval-size", "37", "--num-epochs", "10", "--learning-rate", "2e-2"]
    flags += ["--logging-steps", "1", "--save-steps", "1000", "--seed", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLOUD_RUN_EXECUTION": execution}
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer", *flags],
        cwd=REPO,
        env={**env, "CLOUD_RUN_TASK_ATTEMPT": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in first.stdout:
        if " loss " in line:  # training has started: Cloud Run stops the task
            first.send_signal(signal.SIGTERM)
            break
    output = first.stdout.read()
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, output
    checkpoints = [path.name for path in run_dir.glob("checkpoint-*")]
    assert len(checkpoints) == 1, output
    stopped_at = int(checkpoints[0].split("-")[1])
    assert 0 < stopped_at < 100
    assert f"stopped by SIGTERM at step {stopped_at}; the next attempt resumes from {run_dir}" in output
    assert not (run_dir / "results.json").exists()
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["plan"]["batch_size"] == 8

    # The retry, in this process: auto would now pick batch 4, as a GPU's memory probes might; and every
    # evaluation is counted.
    monkeypatch.setattr("trainer.speed.CPU_BATCH_SIZE", 4)
    evaluations = []

    def counted_predict(*args, **kwargs):
        evaluations.append(args[0])
        return real_predict(*args, **kwargs)

    real_predict = trainer_main.predict_ranked
    monkeypatch.setattr("trainer.__main__.predict_ranked", counted_predict)
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", execution)
    monkeypatch.setenv("CLOUD_RUN_TASK_ATTEMPT", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caplog.set_level(logging.INFO)
    assert main(flags) == 0
    assert f"task attempt 1: resuming from {run_dir / checkpoints[0]}" in caplog.text
    assert "task attempt 1: baseline predictions of an earlier attempt" in caplog.text
    assert evaluations == ["score"]  # the final evaluation only
    results = json.loads((run_dir / "results.json").read_text())
    assert results["train"]["steps"] == 100  # batch 8, as the checkpoint was made with; batch 4: 190
    assert results["task_attempt"] == 1
    labels = trainer_main.load_pets(str(pets), 74, 37, seed=0).test["label"]
    assert results["baseline"] == trainer_main.summary_metrics(labels, state["baseline"]["score"])
