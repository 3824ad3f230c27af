"""End to end on the tiny model: learning, results.json, logs, upload, merge, resume after a kill."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText

import trainer.__main__ as trainer_main
from trainer import export
from trainer.data import chat_format, load_pets
from trainer.evaluate import answer_log_likelihoods, summary_metrics
from trainer.modeling import load_processor

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
METRICS = {"accuracy", "macro_f1", "unknown_rate"}


def results_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_fine_tuning_lifts_accuracy_from_chance_by_both_methods(trained_run) -> None:
    by_method = results_of(trained_run.run_dir)["by_method"]
    assert set(by_method) == {"score", "generate"}
    for method, phases in by_method.items():
        print(f"{method}: baseline {phases['baseline']} final {phases['final']}")
        assert phases["baseline"]["accuracy"] < 0.1, method
        assert phases["final"]["accuracy"] > 0.5, method
        assert phases["final"]["macro_f1"] > 0.4, method
    # Scoring ranks the 37 names, so it never answers "unknown"; a random model's generation always does.
    assert by_method["score"]["final"]["unknown_rate"] == 0.0
    assert by_method["generate"]["baseline"]["unknown_rate"] > 0.5


def test_results_json_schema(trained_run, tiny_model: Path, pets: Path) -> None:
    results = results_of(trained_run.run_dir)
    assert set(results) == {
        "model_id", "dataset", "train_size", "eval_size", "eval_method", "baseline", "final", "by_method",
        "per_class", "train", "versions", "execution", "task_attempt", "settings", "platform", "phases",
        "warm_start", "started", "region",
    }  # fmt: skip
    assert results["model_id"] == str(tiny_model)
    assert results["dataset"] == str(pets)
    assert (results["train_size"], results["eval_size"], results["eval_method"]) == (740, 222, "both")
    assert (results["execution"], results["task_attempt"]) == (trained_run.execution, 0)
    # When the attempt's process started (to the second, UTC), before its phases; and the region Cloud
    # Run's metadata server names: what `gemma-launch` rebuilds a run's duration and price from.
    started = datetime.strptime(results["started"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    # (/proc/uptime, which the start is counted back from, has centiseconds: a second's slack.)
    assert trained_run.began - timedelta(seconds=1) <= started <= trained_run.ended
    assert (trained_run.ended - started).total_seconds() > sum(results["phases"].values())
    assert results["region"] == trained_run.region
    assert results["baseline"] == results["by_method"]["score"]["baseline"]
    assert results["final"] == results["by_method"]["score"]["final"]
    for phases in results["by_method"].values():
        for metrics in phases.values():
            assert set(metrics) == METRICS
            assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert len(results["per_class"]) == 37
    for row in results["per_class"]:
        assert set(row) == {"name", "precision", "recall", "f1", "support"}
        assert all(0.0 <= row[key] <= 1.0 for key in ("precision", "recall", "f1"))
    assert results["per_class"][2]["name"] == "American Pit Bull Terrier"
    assert sum(row["support"] for row in results["per_class"]) == 222
    assert results["train"]["steps"] == 235  # ceil(740 / 16) * 5
    assert results["train"]["runtime_s"] > 0 and results["train"]["samples_per_s"] > 0
    assert {"python", "torch", "transformers", "trl", "peft"} <= set(results["versions"])


def test_results_json_records_every_flag_and_what_auto_became(trained_run, tiny_model: Path) -> None:
    settings = results_of(trained_run.run_dir)["settings"]
    flags = settings["flags"]
    # Every flag of the trainer's parser, none left out, the token never written.
    assert set(flags) == {
        "model-id", "dataset", "train-size", "eval-size", "num-epochs", "learning-rate", "batch-size",
        "gradient-accumulation-steps", "eval-batch-size", "lora-r", "lora-alpha", "lora-dropout",
        "output-dir", "gcs-output-path", "merge", "checkpoint-strategy", "save-steps", "save-total-limit",
        "logging-steps", "device", "quantization", "eval-method", "max-memory-gib", "gradient-checkpointing",
        "compile", "cache-image-features", "compile-cache", "seed", "dry-run", "sweep-grid",
    }  # fmt: skip
    assert (flags["learning-rate"], flags["num-epochs"], flags["seed"], flags["batch-size"]) == (
        0.02,
        5.0,
        0,
        16,
    )
    assert (flags["lora-r"], flags["lora-alpha"], flags["lora-dropout"]) == (16, 32, 0.05)
    assert (flags["quantization"], flags["compile"], flags["merge"]) == ("auto", "auto", True)
    assert flags["model-id"] == str(tiny_model)
    assert settings["resolved"] == {
        "device": "cpu", "weights": "fp32", "batch_size": 16, "effective_batch_size": 16
    }  # fmt: skip
    assert trained_run.token not in json.dumps(settings)


def test_output_layout(trained_run) -> None:
    run_dir = trained_run.run_dir
    assert (trained_run.output_dir / "LATEST").read_text().strip() == trained_run.execution
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "merged" / "config.json").is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-200", "checkpoint-235"]
    with Image.open(run_dir / "confusion_matrix.png") as image:
        assert image.format == "PNG" and image.width > 500
    log_history = json.loads((run_dir / "training_log.json").read_text())
    assert [entry["step"] for entry in log_history if "loss" in entry] == list(range(10, 235, 10))


def test_adapters_only_on_the_language_model(trained_run) -> None:
    from safetensors import safe_open

    with safe_open(trained_run.run_dir / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and all("language_model" in key and "lora_" in key for key in keys)
    projections = {key.split(".lora_")[0].rsplit(".", 1)[1] for key in keys}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_logs_one_line_per_step_and_the_final_table_without_the_token(trained_run) -> None:
    lines = trained_run.stdout.splitlines()
    step_lines = [line for line in lines if " loss " in line and " lr " in line and "samples/s" in line]
    assert len(step_lines) == 23  # logging every 10 of 235 steps
    assert "step 10/235" in step_lines[0]
    # The end of training, in the same "step N/TOTAL" form the launcher reads for its progress bar.
    assert any(re.search(r" INFO step 235/235: training done in [\d.]+ s$", line) for line in lines)
    assert any("task attempt 0: starting fresh" in line for line in lines)
    # What an attempt spends before training, so a slow start can be told apart (docs/benchmarks.md).
    assert any(" INFO model loaded in " in line for line in lines)
    assert any(" INFO baseline evaluation of 222 images in " in line for line in lines)
    table = [line for line in lines if line.split(" INFO ")[-1].startswith(("score ", "generate "))]
    assert len(table) == 6
    assert "\r" not in trained_run.stdout + trained_run.stderr  # no progress bars when not a terminal
    assert trained_run.token not in trained_run.stdout + trained_run.stderr


def test_the_log_carries_no_library_warnings(trained_run) -> None:
    output = trained_run.stdout + trained_run.stderr
    for noise in ("FutureWarning", "warnings.warn", "non_blocking", "deprecated"):
        assert noise not in output, noise


def test_outputs_are_uploaded_to_the_gcs_path(trained_run, storage_emulator) -> None:
    bucket = storage_emulator.client.bucket(trained_run.bucket)
    names = {blob.name for blob in bucket.list_blobs(prefix="runs/")}
    local = {
        "runs/" + str(path.relative_to(trained_run.output_dir))
        for path in trained_run.run_dir.rglob("*")
        if path.is_file()
    }
    assert names == local | {"runs/LATEST"}
    assert f"runs/{trained_run.execution}/merged/model.safetensors" in names
    uploaded = json.loads(bucket.blob(f"runs/{trained_run.execution}/results.json").download_as_text())
    assert uploaded == results_of(trained_run.run_dir)
    assert bucket.blob("runs/LATEST").download_as_text().strip() == trained_run.execution


def test_merged_model_reloads_and_scores_the_same(trained_run, tiny_model: Path, pets: Path) -> None:
    merged_dir = trained_run.run_dir / "merged"
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    assert not isinstance(merged, PeftModel)
    processor = load_processor(str(merged_dir), None)
    data = load_pets(str(pets), 740, 222, seed=0)
    chat = chat_format(processor, data.class_names)
    merged_scores = answer_log_likelihoods(merged, processor, chat, data.test, batch_size=32)

    adapter = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(tiny_model), trained_run.run_dir
    )
    adapter_scores = answer_log_likelihoods(adapter, processor, chat, data.test, batch_size=32)
    torch.testing.assert_close(merged_scores, adapter_scores, atol=1e-3, rtol=1e-4)

    merged_metrics = summary_metrics(data.test["label"], merged_scores.argmax(-1).tolist())
    assert merged_metrics == results_of(trained_run.run_dir)["by_method"]["score"]["final"]


def test_merge_loads_only_after_the_training_state_is_freed_and_writes_small_shards(
    tiny_model: Path, pets: Path, tmp_path: Path, monkeypatch
) -> None:
    # At 27B the bf16 reload (51 GiB) fits only where the quantized model, its optimizer state, the trainer
    # and the image features were: each must be gone, not merely unused, when the merge loads.
    alive: dict[str, weakref.ref] = {}

    def keep(name: str, function):
        def recorded(*args, **kwargs):
            result = function(*args, **kwargs)
            alive[name] = weakref.ref(result[0] if isinstance(result, tuple) else result)
            return result

        return recorded

    real_train = trainer_main.train

    def train(trainer, *args):
        output = real_train(trainer, *args)
        alive["optimizer"] = weakref.ref(trainer.optimizer)
        return output

    at_merge_load = {}
    real_load = export.load_base_model

    def load_base_model(*args, **kwargs):
        at_merge_load.update({name: ref() is not None for name, ref in alive.items()})
        return real_load(*args, **kwargs)

    monkeypatch.setattr("trainer.__main__.load_model", keep("model", trainer_main.load_model))
    monkeypatch.setattr("trainer.__main__.speed_up", keep("image features", trainer_main.speed_up))
    monkeypatch.setattr("trainer.__main__.build_trainer", keep("trainer", trainer_main.build_trainer))
    monkeypatch.setattr("trainer.__main__.train", train)
    monkeypatch.setattr("trainer.export.load_base_model", load_base_model)
    # The tiny model's 0.5 MB in 100 KB shards, as the 27B's 51 GiB in MERGED_SHARD_SIZE ones.
    monkeypatch.setattr("trainer.export.MERGED_SHARD_SIZE", "100KB")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    flags = ["--model-id", str(tiny_model), "--dataset", str(pets), "--output-dir", str(tmp_path)]
    flags += ["--train-size", "74", "--eval-size", "37", "--num-epochs", "1", "--batch-size", "8"]
    flags += [
        "--learning-rate",
        "2e-2",
        "--eval-method",
        "score",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--merge",
    ]
    assert trainer_main.main(flags) == 0

    assert at_merge_load == {"model": False, "image features": False, "trainer": False, "optimizer": False}
    merged_dir = tmp_path / "merged"
    shards = sorted(path.name for path in merged_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and (merged_dir / "model.safetensors.index.json").is_file()
    # The shards are the merged model: it scores exactly as the base model with the adapter.
    processor = load_processor(str(merged_dir), None)
    data = load_pets(str(pets), 74, 37, seed=0)
    chat = chat_format(processor, data.class_names)
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir)
    adapter = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model), tmp_path)
    torch.testing.assert_close(
        answer_log_likelihoods(merged, processor, chat, data.test, batch_size=37),
        answer_log_likelihoods(adapter, processor, chat, data.test, batch_size=37),
        atol=1e-3,
        rtol=1e-4,
    )


def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(
    trained_run, tiny_model: Path, pets: Path, tmp_path: Path, train_flags: list[str], trainer_cli
) -> None:
    execution = "trainer-job-killed"
    args = [
        "--model-id",
        str(tiny_model),
        "--dataset",
        str(pets),
        "--output-dir",
        str(tmp_path),
        *train_flags,
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CLOUD_RUN_EXECUTION": execution,
        "CLOUD_RUN_TASK_ATTEMPT": "0",
    }
    run_dir = tmp_path / execution
    first = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = run_dir / "checkpoint-50"
    deadline = time.monotonic() + 240
    while not (checkpoint / "trainer_state.json").exists():
        assert first.poll() is None, "the first attempt ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (run_dir / "results.json").exists()
    killed_at = max(
        int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()
    )
    assert killed_at < 235

    second = trainer_cli(args, {"CLOUD_RUN_EXECUTION": execution, "CLOUD_RUN_TASK_ATTEMPT": "1"})
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"task attempt 1: resuming from {run_dir / f'checkpoint-{killed_at}'}" in second.stdout
    first_logged = [line for line in second.stdout.splitlines() if " loss " in line][0]
    assert f"step {killed_at + 10}/235" in first_logged

    resumed, reference = results_of(run_dir), results_of(trained_run.run_dir)
    assert resumed["task_attempt"] == 1
    assert resumed["by_method"] == reference["by_method"]
    assert resumed["per_class"] == reference["per_class"]
    # The report's predictions too, the baseline's top-5 taken from the first attempt's run_state.json.
    images = {
        name: json.loads((d / "predictions.json").read_text())["images"]
        for name, d in (("resumed", run_dir), ("reference", trained_run.run_dir))
    }
    for resumed_image, reference_image in zip(images["resumed"], images["reference"], strict=True):
        assert resumed_image["baseline"] == reference_image["baseline"]
        assert resumed_image["final"]["predicted"] == reference_image["final"]["predicted"]
    # The loss right after the resume point continues the uninterrupted curve: weights were really restored.
    losses = {
        name: {e["step"]: e["loss"] for e in json.loads((d / "training_log.json").read_text()) if "loss" in e}
        for name, d in (("resumed", run_dir), ("reference", trained_run.run_dir))
    }
    for step in range(killed_at + 10, 235, 10):
        assert losses["resumed"][step] == pytest.approx(losses["reference"][step], rel=1e-4), step
