"""A warm start: a new execution of the job reuses the memory plan and torch.compile's artifacts that an
earlier one left under --output-dir/.cache/warm-start/, and nothing that was made for other settings."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.__main__ import main
from trainer.speed.warm_start import ARTIFACTS, WarmStart

REPO = Path(__file__).resolve().parents[2]
# This machine has no GPU to fill: training raises what PyTorch raises when one is full.
FULL_GPU = "CUDA out of memory. Tried to allocate 1.05 GiB. GPU 0 has a total capacity of 22.03 GiB"


def files_under(path: Path) -> dict[str, float]:
    found = [file for file in path.rglob("*") if file.is_file()]
    return {str(file.relative_to(path)): file.stat().st_mtime for file in found}


@pytest.fixture
def one_thread():
    """OMP_NUM_THREADS is read when torch loads, before these in-process runs: OpenMP threads spinning
    against other processes on a shared 2-core machine made them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_new_execution_reuses_the_stored_plan_until_training_runs_out_of_memory(
    tiny_model: Path, few_pets: Path, tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture
) -> None:
    flags = ["--model-id", str(tiny_model), "--dataset", str(few_pets), "--output-dir", str(tmp_path)]
    flags += ["--train-size", "16", "--eval-size", "8", "--eval-batch-size", "8", "--num-epochs", "1"]
    flags += ["--eval-method", "score", "--checkpoint-strategy", "no", "--seed", "0", "--device", "cpu"]
    monkeypatch.setenv("CLOUD_RUN_TASK_ATTEMPT", "0")
    caplog.set_level(logging.INFO)

    def run(execution: str, *extra: str) -> dict:
        monkeypatch.setenv("CLOUD_RUN_EXECUTION", execution)
        assert main([*flags, *extra]) == 0
        results = json.loads((tmp_path / execution / "results.json").read_text())
        assert results["region"] is None  # its metadata server (a closed port here) gave none
        return {"batch": results["settings"]["resolved"]["batch_size"], **results["warm_start"]}

    cache = tmp_path / ".cache" / "warm-start"
    # Compile is off on CPU: a plan but no artifacts.
    assert run("exec-1") == {
        "batch": 8, "plan": "flags", "compile_cache": "off", "compile_cache_saved": False
    }  # fmt: skip
    (key,) = cache.iterdir()
    assert [path.name for path in key.glob("plan-*.json")] and not (key / ARTIFACTS).exists()
    assert json.loads((key / "key.json").read_text())["lora_r_alpha_dropout"] == [16, 32, 0.05]

    # auto would now pick batch 4, as other memory probes might: the stored plan's 8 wins.
    monkeypatch.setattr("trainer.speed.CPU_BATCH_SIZE", 4)
    assert run("exec-2")["batch"] == 8
    assert "batch 8, gradient checkpointing on 0 layers: the plan of an earlier execution" in caplog.text

    # Other adapters are another key; --no-compile-cache reads and writes nothing.
    assert run("exec-3", "--lora-r", "8") == {
        "batch": 4, "plan": "flags", "compile_cache": "off", "compile_cache_saved": False
    }  # fmt: skip
    assert len(list(cache.iterdir())) == 2
    before = files_under(cache)
    assert run("exec-4", "--no-compile-cache")["batch"] == 4
    assert files_under(cache) == before

    def train_on_a_full_gpu(*args, **kwargs):
        raise torch.OutOfMemoryError(FULL_GPU)

    monkeypatch.setattr("trainer.__main__.train", train_on_a_full_gpu)
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", "exec-5")
    assert main(flags) == 2
    # The plan that ran out of memory is not the next execution's: it measures (here: flags) again.
    assert not list(key.glob("plan-*.json"))
    monkeypatch.undo()
    monkeypatch.setattr("trainer.speed.CPU_BATCH_SIZE", 4)
    assert run("exec-6")["plan"] == "flags"


# Two processes with their own empty Inductor caches, as two Cloud Run instances have: the first compiles
# and saves, the second loads and compiles nothing.
COMPILE_ONCE = """
import json, sys
from pathlib import Path
import torch
from trainer.speed.warm_start import WarmStart

warm = WarmStart(Path(sys.argv[1]), {"test": 1}, compiled=True)
warm.load_artifacts()
double = torch.compile(lambda x: (x.sin() * 2).relu(), dynamic=False)
double(torch.randn(8))
warm.save_artifacts()
counters = torch._dynamo.utils.counters["inductor"]
hits, misses = counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]
print(json.dumps({**warm.record(), "hits": hits, "misses": misses}))
"""


def compile_once(directory: Path, inductor: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_ONCE, str(directory)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_compiled_graphs_carry_into_a_fresh_process_once_saved(tmp_path: Path) -> None:
    directory = tmp_path / "warm"
    cold = compile_once(directory, tmp_path / "inductor-1")
    assert (cold["compile_cache"], cold["compile_cache_saved"], cold["misses"]) == ("none yet", True, 1)
    saved = (directory / ARTIFACTS).stat().st_mtime_ns
    assert json.loads((directory / "key.json").read_text()) == {"test": 1}

    warm = compile_once(directory, tmp_path / "inductor-2")
    assert (warm["compile_cache"], warm["hits"], warm["misses"]) == ("loaded", 1, 0)
    # Nothing new was compiled: the file is left as it was.
    assert not warm["compile_cache_saved"] and (directory / ARTIFACTS).stat().st_mtime_ns == saved
    assert not list(directory.glob("*.partial-*"))


def test_a_corrupt_artifacts_file_is_ignored_with_a_warning(tmp_path: Path, caplog) -> None:
    tmp_path.joinpath(ARTIFACTS).write_bytes(b"\x00not pickled artifacts")
    warm = WarmStart(tmp_path, {"test": 1}, compiled=True)
    warm.load_artifacts()
    assert warm.compile_cache == "ignored"
    assert f"compile cache: ignoring {tmp_path / ARTIFACTS}" in caplog.text
    # The next save writes a whole file over it, whatever it holds.
    assert warm.known == set()


def test_a_stored_plan_for_another_request_or_unreadable_is_not_used(tmp_path: Path, caplog) -> None:
    from trainer.speed.memory import Plan

    warm = WarmStart(tmp_path, {"test": 1})
    request = {"max_memory_gib": 85.0, "batch_size": None, "tokens": 300}
    warm.keep_plan(request, Plan(9, 2))
    assert warm.plan(request) == Plan(9, 2)
    assert warm.plan({**request, "tokens": 470}) is None
    (plan_file,) = tmp_path.glob("plan-*.json")
    plan_file.write_text('{"request": ')
    assert warm.plan(request) is None
    assert "memory plan: ignoring" in caplog.text
