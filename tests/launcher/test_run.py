"""up (build + job), run, logs, status and results, end to end through the emulator with a fake trainer.

The fake trainer is a real image built by the emulated Cloud Build from a small source tree; the
emulated Cloud Run runs it as a local process, as the real trainer runs in the demo and the e2e test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.api import launch_stage_pb2
from google.cloud import run_v2
from huggingface_hub import constants

from launcher import logs, overrides
from launcher.cli import main
from launcher.emulator.logging import ReadQuota
from tests.support.emulator import grants_in_effect_once_refused
from tests.support.image_source import image_source
from tests.support.record import changes
from trainer.flags import build_parser

PROJECT = "demo-project"
TOKEN = "hf_run_test_token_abcdef0123456789"
JOB = f"projects/{PROJECT}/locations/europe-west4/jobs/gemma3-finetuning-job"

FAKE_TRAINER = textwrap.dedent(
    """
    import json, os, pathlib, sys

    args = sys.argv[1:]
    merge = "--merge" in args
    flags = dict(zip(*[iter(arg for arg in args if arg != "--merge")] * 2))
    attempt = int(os.environ["CLOUD_RUN_TASK_ATTEMPT"])
    print("argv", json.dumps(args), flush=True)
    print("attempt", attempt, "execution", os.environ["CLOUD_RUN_EXECUTION"], flush=True)
    print("token-present", os.environ.get("HF_TOKEN") == os.environ.get("EXPECTED_TOKEN_SHA"), flush=True)
    # What this attempt does, chosen by the test through a valid trainer setting (the launcher checks
    # every --set against the trainer's flags).
    strategy = {"101": "fail-once", "102": "always-fail", "103": "sleep"}.get(flags.get("--seed"))
    if strategy == "sleep":
        import time
        time.sleep(60)
    if strategy == "always-fail" or (strategy == "fail-once" and attempt == 0):
        print("failing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    for step in range(10, 41, 10):  # the real trainer's step lines
        print(f"INFO step {step}/40 epoch {step / 40:.2f} loss {4 - step / 20:.4f}", flush=True)
    out = pathlib.Path(flags["--output-dir"]) / os.environ["CLOUD_RUN_EXECUTION"]
    out.mkdir(parents=True, exist_ok=True)
    lr = float(flags.get("--learning-rate", "0.001"))
    results = {
        "model_id": flags["--model-id"], "dataset": flags["--dataset"], "train_size": 10, "eval_size": 5,
        "eval_method": "score",
        "baseline": {"accuracy": 0.05, "macro_f1": 0.02, "unknown_rate": 0.0},
        "final": {"accuracy": 0.8, "macro_f1": 0.75 + lr, "unknown_rate": 0.0},
        "train": {"steps": 40, "runtime_s": 4.0, "samples_per_s": 16.0},
        "phases": {"load_s": 1.0, "image_features_s": 1.0, "baseline_s": 1.0, "memory_plan_s": 1.0,
                   "train_s": 4.0, "final_eval_s": 1.0, "save_s": 1.0},
    }
    (out / "results.json").write_text(json.dumps(results))
    (out / "adapter_model.safetensors").write_bytes(b"adapter")
    (out / "confusion_matrix.png").write_bytes(b"png")
    if merge:
        (out / "merged").mkdir(exist_ok=True)
        (out / "merged" / "config.json").write_text("{}")
    print("done", flush=True)
    """
)


# --set values that make the fake trainer fail once, always fail, or sleep for a minute.
FAIL_ONCE, ALWAYS_FAIL, SLEEP = "seed=101", "seed=102", "seed=103"


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return image_source(
        tmp_path / "fake-project", ["python", "fake_trainer.py"], {"fake_trainer.py": FAKE_TRAINER}
    )


@pytest.fixture
def env(local, monkeypatch, project_dir):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return local


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def up(project_dir: Path, *args: str):
    return cli("up", "--skip-stage", "--source", str(project_dir), "--max-retries", "1", *args)


def test_up_creates_the_gpu_job_as_cloud_run_receives_it(env, project_dir):
    result = up(project_dir, "--verbose")
    assert result.exit_code == 0, result.output
    assert "Step 1/4 : FROM python:3.11-slim" in result.output  # --verbose: the whole build log
    assert any(line.split()[:2] == ["created", "job"] for line in result.output.splitlines())
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    task = job.template.template
    container = task.containers[0]
    assert container.image.startswith("europe-west4-docker.pkg.dev/demo-project/gemma3-finetuning-repo/")
    assert "@sha256:" in container.image
    assert dict(container.resources.limits) == {"cpu": "20", "memory": "80Gi", "nvidia.com/gpu": "1"}
    assert task.node_selector.accelerator == "nvidia-rtx-pro-6000"
    assert task.gpu_zonal_redundancy_disabled is True
    assert task.max_retries == 1
    assert task.timeout.total_seconds() == 3600
    assert task.service_account == f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    assert task.volumes[0].gcs.bucket == f"{PROJECT}-gemma3-finetuning"
    assert container.volume_mounts[0].mount_path == "/mnt/gcs"
    (secret_env,) = [env_var for env_var in container.env if env_var.name == "HF_TOKEN"]
    assert secret_env.value == ""
    assert secret_env.value_source.secret_key_ref.secret == "HF_TOKEN"
    assert list(container.args)[:6] == [
        "--model-id",
        "/mnt/gcs/google/gemma-3-27b-it",
        "--dataset",
        "/mnt/gcs/datasets/oxford-iiit-pet",
        "--output-dir",
        "/mnt/gcs/runs",
    ]
    assert list(container.args)[-2:] == ["--device", "cuda"]
    assert job.launch_stage == launch_stage_pb2.LaunchStage.BETA


def test_second_up_rewrites_nothing_and_a_changed_setting_updates_the_job(env, project_dir):
    first = up(project_dir)
    assert first.exit_code == 0, first.output
    # Off a terminal the build is summarised: the line naming it, then a line per quarter of its steps.
    build_lines = [line.strip() for line in first.output.splitlines() if "Cloud Build" in line]
    assert re.fullmatch(r"Cloud Build [\w-]+ started", build_lines[0]), build_lines
    assert [line.split(" (")[0] for line in build_lines[1:]] == [
        "Cloud Build: step 1/2",
        "Cloud Build: step 2/2",
    ]
    assert "Step #" not in first.output and "FROM python" not in first.output
    before = len(env.record())
    again = up(project_dir)
    assert again.exit_code == 0, again.output
    assert "Everything was already in place" in again.output
    methods = [entry["method"] for entry in env.record()[before:]]
    assert "CreateBuild" not in methods and "UpdateJob" not in methods and "CreateJob" not in methods

    # The plan and the update say what changes, field by field.
    diff = 'template.template.timeout: "3600s" -> "7200s"'
    planned = up(project_dir, "--task-timeout", "2h", "--dry-run")
    assert planned.exit_code == 0, planned.output
    lines = planned.output.splitlines()
    (job_line,) = [
        index for index, line in enumerate(lines) if line.split()[:3] == ["would", "update", "job"]
    ]
    assert lines[job_line + 1].strip() == diff, planned.output
    changed = up(project_dir, "--task-timeout", "2h")
    assert changed.exit_code == 0, changed.output
    assert any("updated" in line and "job" in line for line in changed.output.splitlines())
    assert diff in changed.output
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    assert job.template.template.timeout.total_seconds() == 2 * 3600


def test_dry_run_shows_the_job_spec_and_gcloud_command(env, project_dir):
    result = up(project_dir, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "gcloud beta run jobs create gemma3-finetuning-job" in result.output
    assert "--gpu-type=nvidia-rtx-pro-6000" in result.output
    assert "--set-secrets=HF_TOKEN=HF_TOKEN:latest" in result.output
    assert '"nvidia.com/gpu": "1"' in result.output
    assert '"launch_stage": "BETA"' in result.output  # enums by name, as gcloud and the API show them
    assert "Estimated cost of `gemma-launch run`: ≈ $" in result.output  # the trainer's default sizes
    commands = result.output.split("Equivalent commands:")[1]
    assert "gcloud builds submit" in commands and "gcloud beta run jobs create" in commands
    assert not [
        entry for entry in env.record() if entry["method"].startswith(("Create", "Update", "Add", "Set"))
    ]


@pytest.mark.slow
def test_run_follow_streams_logs_with_overrides_and_results_prints_the_table(env, project_dir):
    assert up(project_dir).exit_code == 0
    result = cli("run", "--set", "learning-rate=0.125", "--train-size", "64", "--follow")
    assert result.exit_code == 0, result.output
    assert "Started execution gemma3-finetuning-job-" in result.output
    argv_line = next(line for line in result.output.splitlines() if " argv " in line)
    assert "[task 0]" in argv_line
    argv = json.loads(argv_line.split(" argv ", 1)[1])
    assert argv[argv.index("--learning-rate") + 1] == "0.125"
    assert argv[argv.index("--train-size") + 1] == "64"
    assert argv[argv.index("--output-dir") + 1].endswith("/runs")
    assert "done" in result.output
    assert "succeeded: 1/1 tasks succeeded" in result.output
    # Off a terminal the trainer's step lines become a line at each quarter of the steps.
    quarters = [line.split("] ", 1)[1] for line in result.output.splitlines() if "] training: " in line]
    assert [line.split(", about")[0] for line in quarters] == [
        f"training: step {step}/40 ({step * 100 // 40}%), loss {4 - step / 20:.4f}"
        for step in (10, 20, 30, 40)
    ]
    assert " epoch " not in result.output
    # The overrides were for that execution only.
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    assert "--learning-rate" not in job.template.template.containers[0].args

    table = cli("results")
    assert table.exit_code == 0, table.output
    assert "Accuracy" in table.output and "5.0%" in table.output and "80.0%" in table.output
    assert "+75.0 pp" in table.output  # a difference of percentages, in percentage points
    as_json = json.loads(cli("results", "--json").output)
    assert as_json["final"]["macro_f1"] == pytest.approx(0.875)

    logs = cli("logs")
    assert logs.exit_code == 0
    assert logs.output.count(" done") == 1  # history shows each line once
    assert logs.output.count(" epoch ") == 4  # every line, as the trainer wrote it

    status = cli("status", "--json")
    (row,) = json.loads(status.output)
    assert row["state"] == "Succeeded" and row["succeeded"] == 1 and row["retried"] == 0


@pytest.mark.slow
def test_a_failed_attempt_is_retried_and_the_retry_sees_attempt_1(env, project_dir):
    assert up(project_dir).exit_code == 0
    result = cli("run", "--set", FAIL_ONCE, "--follow")
    assert result.exit_code == 0, result.output
    assert "failing on purpose" in result.output
    assert "attempt 1 execution" in result.output
    status = json.loads(cli("status", "--json").output)
    assert status[0]["retried"] == 1 and status[0]["state"] == "Succeeded"


EXIT_3 = "failed with message: The container exited with an error (exit code 3)."


@pytest.mark.slow
def test_a_failed_execution_says_why_in_run_status_and_results(env, project_dir):
    assert up(project_dir).exit_code == 0
    result = cli("run", "--set", ALWAYS_FAIL, "--follow")
    assert result.exit_code == 1, result.output
    assert "failed: 0/1 tasks succeeded" in result.output and EXIT_3 in result.output
    (row,) = json.loads(cli("status", "--json").output)
    assert row["state"] == "Failed" and row["why"].endswith(EXIT_3)
    table = cli("status")
    assert f"{row['execution']} failed: Task {row['execution']}-task0 {EXIT_3}" in table.output, table.output
    # For people, the JSON's ISO time and seconds as a date and hours, minutes, seconds.
    assert f"{row['started'][:10]} {row['started'][11:19]}" in table.output, table.output
    assert re.search(r"\b\dh\d\dm\d\ds\b", table.output), table.output
    missing = cli("results")
    assert missing.exit_code == 2
    assert f"Error: Execution {row['execution']} failed, so it has no results: Task" in missing.output
    assert EXIT_3 in missing.output and f"gemma-launch logs {row['execution']}" in missing.output
    assert "may still be running" not in missing.output
    page = cli("report", row["execution"])
    assert page.exit_code == 2, page.output
    assert f"Error: Execution {row['execution']} failed, so it has no results: Task" in page.output
    assert "Hint: See what happened with" in page.output and "Traceback" not in page.output
    assert not list(Path.cwd().glob("*.html"))


@pytest.mark.slow
def test_an_unknown_execution_is_an_error_that_lists_the_recent_ones(env, project_dir):
    assert up(project_dir).exit_code == 0
    for command in ("logs", "results", "cancel", "report"):
        result = cli(command, "does-not-exist")
        assert result.exit_code == 2, (command, result.output)
        assert (
            "Error: Execution does-not-exist of job gemma3-finetuning-job does not exist, and "
            "gs://demo-project-gemma3-finetuning/runs/does-not-exist/ holds nothing of it"
        ) in result.output
        assert "Hint: Start one with `gemma-launch run`." in result.output
    assert cli("run", "--follow").exit_code == 0
    (row,) = json.loads(cli("status", "--json").output)
    for command in ("logs", "results", "cancel", "report"):
        result = cli(command, "does-not-exist")
        assert result.exit_code == 2, (command, result.output)
        assert f"Hint: The job's recent executions, newest first: {row['execution']} " in result.output
        assert "Traceback" not in result.output


def test_logs_of_a_task_that_has_logged_nothing_yet_say_so_on_stderr(env, project_dir):
    assert up(project_dir).exit_code == 0
    # One task at a time: task 1 waits for task 0's minute.
    started = cli("sweep", "--grid", "lora-r=8,16", "--set", SLEEP, "--parallelism", "1")
    assert started.exit_code == 0, started.output
    name = re.search(r"Started execution (\S+)", started.output)[1]
    for as_json in ([], ["--json"]):
        pending = cli("logs", "--task", "1", *as_json)
        assert pending.exit_code == 0, pending.output
        assert pending.stdout == ""
        assert pending.stderr == f"No log lines yet from task 1 of execution {name} (pending).\n"
    assert cli("cancel", name).exit_code == 0


def test_cancel_stops_the_running_execution_and_run_refuses_to_start_a_second(env, project_dir):
    assert up(project_dir).exit_code == 0
    started = cli("run", "--set", SLEEP)
    assert started.exit_code == 0, started.output
    (row,) = json.loads(cli("status", "--json").output)
    running = row["execution"]
    # Each command's hint names itself as the one to run again once the execution has ended.
    for command in ("results", "report"):
        early = cli(command)
        assert early.exit_code == 2 and f"Error: Execution {running} is still " in early.output, early.output
        assert (
            f"Hint: Follow it with `gemma-launch logs {running} --follow`, then run "
            f"`gemma-launch {command} {running}`."
        ) in early.output

    second = cli("run")
    assert second.exit_code == 2, second.output
    assert f"Error: Execution {running} of job gemma3-finetuning-job is still" in second.output
    assert f"gemma-launch cancel {running}" in second.output and "--allow-concurrent" in second.output
    assert len(run_jobs(env)) == 1

    cancelled = cli("cancel", "--json")
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.output) == {"execution": running, "status": "cancelled", "state": "Cancelled"}
    assert json.loads(cli("status", "--json").output)[0]["state"] == "Cancelled"
    for command in ("results", "report"):
        none = cli(command)
        assert none.exit_code == 2, none.output
        assert none.output == (
            f"Error: Execution {running} was cancelled before it wrote results.\n"
            f"Hint: `gemma-launch status` lists the job's executions, and `gemma-launch {command} EXECUTION` "
            "shows one that succeeded; `gemma-launch run` starts a new one.\n"
        )
    again = cli("cancel")
    assert again.exit_code == 0, again.output
    assert "No execution of job gemma3-finetuning-job is running: nothing to cancel." in again.output
    named = cli("cancel", running)
    assert named.exit_code == 0, named.output
    assert f"Execution {running} had already finished (cancelled): nothing to cancel." in named.output
    cancels = [entry for entry in env.record() if entry["method"] == "CancelExecution"]
    assert len(cancels) == 1


@pytest.mark.slow
def test_results_says_where_each_output_is(env, project_dir):
    assert up(project_dir).exit_code == 0
    assert cli("run", "--set", "merge=true", "--follow").exit_code == 0
    merged = json.loads(cli("status", "--json").output)[0]["execution"]
    run_dir = f"{PROJECT}-gemma3-finetuning/runs/{merged}"
    browser = "https://console.cloud.google.com/storage/browser"
    result = cli("results")
    assert result.exit_code == 0, result.output
    # Another bucket than the job's holds no results: the error names the job's.
    for command in ("results", "report"):
        elsewhere = cli(command, "--bucket", "another-bucket")
        assert elsewhere.exit_code == 2, elsewhere.output
        assert elsewhere.output.startswith(
            f"Error: Execution {merged} wrote its outputs to gs://{PROJECT}-gemma3-finetuning/, not to "
            "bucket another-bucket.\nHint: Give --bucket demo-project-gemma3-finetuning, the bucket its job"
        )
    # An execution named twice is shown once, as `report` does: not compared with itself.
    assert cli("results", merged, merged).output == result.output
    for label, url, page in (
        ("adapter", f"gs://{run_dir}/", f"{browser}/{run_dir}?project={PROJECT}"),
        ("merged model", f"gs://{run_dir}/merged/", f"{browser}/{run_dir}/merged?project={PROJECT}"),
        (
            "results.json",
            f"gs://{run_dir}/results.json",
            f"{browser}/_details/{run_dir}/results.json?project={PROJECT}",
        ),
        (
            "confusion matrix",
            f"gs://{run_dir}/confusion_matrix.png",
            f"{browser}/_details/{run_dir}/confusion_matrix.png?project={PROJECT}",
        ),
    ):
        assert f"{label:<17} {url}  (" in result.output, (label, result.output)
        assert f"{'':<17} {page}\n" in result.output, (page, result.output)
    outputs = json.loads(cli("results", "--json").output)["outputs"]
    assert [(out["label"], out["present"]) for out in outputs] == [
        ("adapter", True),
        ("merged model", True),
        ("results.json", True),
        ("confusion matrix", True),
    ]

    assert cli("run", "--follow").exit_code == 0
    plain = cli("results")
    assert plain.exit_code == 0, plain.output
    assert "merged model      not written: the run had no --merge; `gemma-launch run --set merge=true`" in (
        plain.output
    )
    assert "/merged/" not in plain.output
    # Both executions on one page; this trainer wrote results.json only, as trainers before the report did.
    both = cli("report", merged, "--out", "pages")
    assert both.exit_code == 0, both.output
    newest = cli("report", "--out", "pages")
    assert newest.exit_code == 0, newest.output
    (page,) = [path for path in Path("pages").iterdir() if path.name != f"report-{merged}.html"]
    assert f"Wrote pages/{page.name} (" in newest.output
    html = page.read_text()
    assert "Baseline vs fine-tuned" in html and "80.0%" in html
    assert "no predictions.json" in html


def test_run_rejects_unknown_keys_with_the_closest_one(env, project_dir):
    result = cli("run", "--set", "learning_rate=1")
    assert result.exit_code == 2
    assert "Error: Unknown trainer setting 'learning_rate' (--set learning_rate=1)." in result.output
    assert "Hint: Did you mean learning-rate? Settings: train-size, eval-size," in result.output


def test_every_trainer_flag_is_a_setting_but_the_ones_gemma_launch_sets():
    options = {
        option.removeprefix("--")
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and not option.startswith("--no-") and option != "--help"
    }
    assert set(overrides.settable()) == options - set(overrides.LAUNCHER_SET)
    assert set(overrides.LAUNCHER_SET) < options
    assert {"max-memory-gib", "compile", "cache-image-features"} <= set(overrides.settable())
    listed = cli("run", "--help").output
    assert "max-memory-gib" in listed and "compile" in listed


def test_run_checks_every_set_against_the_trainers_flags_before_starting(env, project_dir):
    assert up(project_dir).exit_code == 0
    for pair, error, hint in (
        (
            "learning-rate=abc",
            "Error: Invalid --set learning-rate=abc: must be a positive number, got 'abc'.",
            "Hint: learning-rate takes a positive number (default 0.0002).",
        ),
        (
            "quantization=8bit",
            "Error: Invalid --set quantization=8bit: invalid choice: '8bit'",
            "Hint: quantization takes one of auto, fp8, int8, 4bit, none (default auto).",
        ),
        ("merge=yes", "Error: Invalid --set merge=yes: merge is a switch, got 'yes'.", "Hint: Give merge"),
        (
            "output-dir=/tmp/out",
            "Error: --set output-dir=/tmp/out: output-dir is not a setting: each execution writes to "
            "gs://BUCKET/runs/<execution>/",
            "Hint: Leave it out;",
        ),
        ("hf-token=hf_x", "hf-token is not a setting: the token reaches the job only from Secret", ""),
    ):
        result = cli("run", "--set", pair, "--follow")
        assert result.exit_code == 2, result.output
        assert error in result.output and hint in result.output, result.output
    assert run_jobs(env) == []

    levers = ("max-memory-gib=40", "compile=off", "cache-image-features=false", "gradient-checkpointing=on")
    result = cli("run", *[arg for pair in levers for arg in ("--set", pair)], "--follow")
    assert result.exit_code == 0, result.output
    argv_line = next(line for line in result.output.splitlines() if " argv " in line)
    argv = json.loads(argv_line.split(" argv ")[1])
    for flag, value in (("--max-memory-gib", "40"), ("--compile", "off"), ("--gradient-checkpointing", "on")):
        assert argv[argv.index(flag) + 1] == value
    assert "--no-cache-image-features" in argv


def pets_dir(root: Path, trainval: int, test: int) -> Path:
    """A dataset in the official layout (the images' bytes do not matter to the fake trainer)."""
    pets = root / "pets"
    rows = {"trainval": [f"Abyssinian_{n} 1 1 1" for n in range(trainval)]}
    rows["test"] = [f"Abyssinian_{trainval + n} 1 1 1" for n in range(test)]
    files = {
        "annotations/list.txt": "#Image CLASS-ID\n" + "\n".join(rows["trainval"] + rows["test"]),
        "annotations/trainval.txt": "\n".join(rows["trainval"]) + "\n",
        "annotations/test.txt": "\n".join(rows["test"]) + "\n\n",
    }
    files |= {f"images/Abyssinian_{n}.jpg": "jpeg" for n in range(trainval + test)}
    for name, text in files.items():
        (pets / name).parent.mkdir(parents=True, exist_ok=True)
        (pets / name).write_text(text)
    return pets


def test_sizes_are_checked_against_the_staged_splits_before_anything_starts(env, project_dir, tmp_path):
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pets = pets_dir(tmp_path, trainval=3, test=2)
    sources = ["--source", str(project_dir), "--model-source", str(model), "--dataset-source", str(pets)]
    made = cli("up", *sources)
    assert made.exit_code == 0, made.output
    # The command `up` ends with fits the dataset it staged, smaller than the trainer's defaults.
    assert (
        "Ready. Start a fine-tuning run with: gemma-launch run --set train-size=3 --set eval-size=2 --follow"
        in made.output
    )
    assert "train-size = 3 and eval-size = 2 in [trainer] of gemma-launch.toml" in made.output
    staged = json.loads(
        (
            env.emulator.bucket_dir(f"{PROJECT}-gemma3-finetuning")
            / "datasets/pets/.gemma-launch-staged.json"
        ).read_text()
    )
    assert staged["splits"] == {"train": 3, "test": 2}

    # Both defaults are too large: one error names both, and its one command fixes both.
    default = cli("run", "--follow")
    assert default.exit_code == 2, default.output
    assert (
        "Error: train-size 3680 (the trainer's default) is larger than the trainval (train) split of the "
        f"staged dataset gs://{PROJECT}-gemma3-finetuning/datasets/pets/ (3 images); eval-size 1000 (the "
        "trainer's default) is larger than the test split (2 images)." in default.output
    )
    assert (
        "Hint: Use train-size 3 or less and eval-size 2 or less: `gemma-launch run --set train-size=3 "
        "--set eval-size=2` for one run, or train-size = 3 and eval-size = 2 in [trainer]" in default.output
    )
    one = cli("run", "--train-size", "3")
    assert one.exit_code == 2 and "Error: eval-size 1000 (the trainer's default) is larger" in one.output
    assert "Hint: Use 2 or less: `gemma-launch run --set eval-size=2` for one run, or eval-size = 2" in (
        one.output
    )
    # A sweep's hint names the sweep's own flag: --set for a size its tasks share, --grid for one it varies.
    shared = cli("sweep", "--grid", "lora-r=8,16")
    assert (
        shared.exit_code == 2 and "Error: train-size 3680 (the trainer's default) is larger" in shared.output
    )
    assert (
        "`gemma-launch sweep --set train-size=3 --set eval-size=2` for every task, or train-size = 3"
        in shared.output
    )
    varied = cli("sweep", "--grid", "train-size=2,5", "--set", "eval-size=2")
    assert varied.exit_code == 2 and "Error: train-size 5 is larger than the trainval" in varied.output
    assert "Hint: Give --grid train-size= values of 3 or less." in varied.output
    too_many = cli("run", "--train-size", "3", "--set", "eval-size=5")
    assert too_many.exit_code == 2 and "eval-size 5 is larger than the test split" in too_many.output
    assert run_jobs(env) == []
    fits = cli("run", "--set", "train-size=3", "--set", "eval-size=2", "--follow")
    assert fits.exit_code == 0, fits.output

    # Sizes set for every run are checked by `up`, before the job takes them.
    Path("gemma-launch.toml").write_text("[trainer]\ntrain-size = 10\n")
    before = len(env.record())
    refused = cli("up", *sources)
    assert refused.exit_code == 2, refused.output
    assert "Error: train-size 10 is larger than the trainval (train) split" in refused.output
    assert "UpdateJob" not in [entry["method"] for entry in env.record()[before:]]


def test_a_bucket_named_to_up_alone_is_named_by_the_run_refused_and_every_command_takes_it(
    env, project_dir, tmp_path
):
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pets = pets_dir(tmp_path, trainval=3, test=2)
    mine = f"{PROJECT}-mine"
    sources = ["--source", str(project_dir), "--model-source", str(model), "--dataset-source", str(pets)]
    assert cli("up", "--bucket", mine, *sources).exit_code == 0
    # Without --bucket, run would check the default bucket's dataset, which the job does not read.
    other = cli("run", "--set", "train-size=3", "--set", "eval-size=2")
    assert other.exit_code == 2, other.output
    assert other.output == (
        f"Error: Job gemma3-finetuning-job reads bucket gs://{mine}, not gs://{PROJECT}-gemma3-finetuning: "
        "the settings name another bucket than `up` gave the job.\n"
        f'Hint: Pass --bucket {mine}, or set BUCKET_NAME={mine} or bucket = "{mine}" in gemma-launch.toml '
        "so that every command finds it.\n"
    )
    assert cli("sweep", "--grid", "seed=1,2").output == other.output
    assert run_jobs(env) == []
    # With it, the sizes are checked against the dataset the job reads.
    too_big = cli("run", "--bucket", mine)
    assert (
        too_big.exit_code == 2 and f"staged dataset gs://{mine}/datasets/pets/ (3 images)" in too_big.output
    )
    ran = cli("run", "--bucket", mine, "--set", "train-size=3", "--set", "eval-size=2", "--follow")
    assert ran.exit_code == 0, ran.output
    execution = json.loads(cli("status", "--json").output)[0]["execution"]
    # After `down`, status and logs find the run in the bucket it wrote to, once told which.
    assert cli("down", "--bucket", mine).exit_code == 0
    kept = json.loads(cli("status", "--bucket", mine, "--json").output)
    assert [(run["execution"], run["execution_record"]) for run in kept] == [(execution, False)]
    elsewhere = cli("status")
    assert elsewhere.exit_code == 2 and "(give --bucket if `up` used another bucket)" in elsewhere.output
    assert cli("logs", execution, "--bucket", mine).exit_code == 0
    assert cli("cancel", execution, "--bucket", mine).exit_code == 0


@pytest.mark.parametrize("command", ["up", "stage"])
def test_a_wrong_source_directory_is_reported_before_anything_is_created(
    fresh, monkeypatch, tmp_path, command
):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    pets = pets_dir(tmp_path, trainval=3, test=2)
    (pets / "annotations" / "test.txt").unlink()
    for sources, error in (
        (["--model-source", "./no-such-model"], "Error: Model directory ./no-such-model does not exist."),
        (
            ["--model-source", "tiny-gemma3"],
            "Error: --model-source tiny-gemma3 is neither a directory here nor a Hugging Face model id",
        ),
        (["--model-source", str(tmp_path)], "has no config.json"),
        (
            ["--model-source", str(model), "--dataset-source", str(pets)],
            "is in the Oxford-IIIT Pet layout but lacks annotations/test.txt.",
        ),
    ):
        result = cli(command, *sources)
        assert result.exit_code == 2, result.output
        assert error in result.output and "Hint: " in result.output, result.output
    assert fresh.record() == []


def test_commands_before_up_say_what_to_do(env):
    for command in (["run"], ["logs"], ["status"], ["results"], ["report"]):
        result = cli(*command)
        assert result.exit_code == 2, (command, result.output)
        assert "Hint:" in result.output
        assert "Traceback" not in result.output


@pytest.mark.slow
def test_the_token_crosses_the_wire_only_in_add_secret_version(env, project_dir):
    assert up(project_dir).exit_code == 0
    result = cli("run", "--follow")
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    carrying = {entry["method"] for entry in env.record() if TOKEN in json.dumps(entry)}
    assert carrying <= {"AddSecretVersion"}
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    assert TOKEN not in run_v2.Job.to_json(job)


QUOTA_ID = "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion"


def test_run_starts_and_bills_one_task_even_on_a_job_left_with_a_sweeps_task_count(env, project_dir):
    assert up(project_dir).exit_code == 0
    jobs = env.clients(PROJECT).jobs
    left = jobs.get_job(name=JOB)  # as a sweep leaves it when killed before putting the job back
    left.template.task_count, left.template.parallelism = 4, 4
    jobs.update_job(job=left).result()
    started = cli("run", "--set", SLEEP)
    assert started.exit_code == 0, started.output
    # The estimate is one task's: the job's own count of 4 would bill four GPUs for one training.
    assert "Estimated cost: ≈ $" in started.output and "x 4 tasks" not in started.output
    (sent,) = run_jobs(env)
    assert sent["request"]["overrides"]["taskCount"] == 1
    (row,) = json.loads(cli("status", "--json").output)
    assert row["tasks"] == 1, row
    assert cli("cancel").exit_code == 0


def run_jobs(env) -> list[dict]:
    return [entry for entry in env.record() if entry["method"] == "RunJob"]


def test_run_without_gpu_quota_is_refused_before_any_run_job(env, project_dir):
    assert up(project_dir).exit_code == 0
    env.emulator.services["quotas"].set_gpu_quota(0)
    result = cli("run", "--follow")
    assert result.exit_code == 2, result.output
    assert (
        f"Error: The project has no Cloud Run GPU quota for nvidia-rtx-pro-6000 in europe-west4 ({QUOTA_ID}"
        in (result.output)
    )
    assert f"Hint: Request {QUOTA_ID} for region europe-west4 at " in result.output
    assert "https://console.cloud.google.com/iam-admin/quotas?project=demo-project" in result.output
    assert "Traceback" not in result.output
    # Another GPU than the job's would read another quota (none: no quota at all) than Cloud Run asks for.
    for command in (
        ["run"],
        ["sweep", "--grid", "lora-r=8,16"],
        ["sweep", "--grid", "lora-r=8,16", "--dry-run"],
    ):
        for gpu, wanted in (
            (["--gpu", "none"], "none"),
            (["--zonal-redundancy"], "nvidia-rtx-pro-6000 with zonal redundancy"),
        ):
            other = cli(*command, *gpu)
            assert other.exit_code == 2, (command, gpu, other.output)
            assert other.output == (
                f"Error: Job gemma3-finetuning-job runs on nvidia-rtx-pro-6000, not {wanted}: an "
                "execution runs on the job's GPU, as `up` made it.\n"
                f"Hint: Run `gemma-launch up` with these settings to move the job to {wanted}, or start the "
                "execution with the job's: --gpu nvidia-rtx-pro-6000 --no-zonal-redundancy.\n"
            )
    assert run_jobs(env) == []


def test_run_refuses_a_job_whose_account_was_deleted_after_up_and_up_makes_it_again(env, project_dir):
    assert up(project_dir).exit_code == 0
    account = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    env.clients(PROJECT).iam.delete_service_account(name=f"projects/{PROJECT}/serviceAccounts/{account}")
    sweep = ("sweep", "--grid", "learning-rate=1e-4,2e-4")
    for command in (("run",), sweep, (*sweep, "--dry-run")):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert (
            f"Error: Job gemma3-finetuning-job runs as service account {account}, which no longer exists"
            in (result.output)
        )
        assert "Hint: Run `gemma-launch up` to create it again and grant its roles" in result.output
        assert "Traceback" not in result.output
    assert run_jobs(env) == []
    (doctor,) = [
        line for line in cli("doctor").output.splitlines() if line[2:].startswith("service accounts")
    ]
    assert doctor.startswith(
        f"✗ service accounts {account} no longer exists, but job gemma3-finetuning-job does: deleted after "
        "`up`, so `run` is refused."
    )
    assert doctor.endswith(
        "Fix: Run `gemma-launch up`: it creates the accounts again and grants their roles."
    )
    assert up(project_dir).exit_code == 0
    assert cli("run").exit_code == 0
    assert len(run_jobs(env)) == 1
    assert "✓ service accounts" in cli("doctor").output


def test_a_disabled_account_stops_run_sweep_and_up_which_leave_it_disabled_until_enabled(env, project_dir):
    assert up(project_dir).exit_code == 0
    account = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    builder = f"gemma3-finetuning-build@{PROJECT}.iam.gserviceaccount.com"
    iam = env.clients(PROJECT).iam
    iam.disable_service_account(request={"name": f"projects/{PROJECT}/serviceAccounts/{account}"})
    env.record_path.write_text("")
    sweep = ("sweep", "--grid", "learning-rate=1e-4,2e-4")
    for command in (("run",), sweep, (*sweep, "--dry-run"), (*sweep, "--dry-run", "--json")):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert result.output.endswith(
            f"Error: Job gemma3-finetuning-job runs as service account {account}, which is disabled: no task "
            "can start as it.\n"
            "Hint: `gemma-launch up` does not enable an account someone disabled: if it was not disabled on "
            f"purpose, enable it with `gcloud iam service-accounts enable {account} --project {PROJECT}`, "
            "then run this again.\n"
        )
    assert changes(env) == []  # the dry runs too: refused before they show a plan, as the sweep is
    iam.disable_service_account(request={"name": f"projects/{PROJECT}/serviceAccounts/{builder}"})
    (doctor,) = [
        line for line in cli("doctor").output.splitlines() if line[2:].startswith("service accounts")
    ]
    assert doctor.startswith(
        f"✗ service accounts {account} is disabled, so the job's tasks could not start; {builder} is "
        "disabled, so image builds would fail: `run` and `up` are refused."
    )
    assert doctor.endswith(
        "if they were not disabled on purpose, enable them with "
        f"`gcloud iam service-accounts enable {account} --project {PROJECT}` and "
        f"`gcloud iam service-accounts enable {builder} --project {PROJECT}`."
    )
    env.record_path.write_text("")
    refused = up(project_dir)
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith(
        f"Error: Stopped before creating anything: service accounts: {account} is disabled"
    )
    assert "Hint: `gemma-launch up` does not enable an account someone disabled" in refused.output
    assert changes(env) == []
    for email in (account, builder):
        assert iam.get_service_account(name=f"projects/{PROJECT}/serviceAccounts/{email}").disabled
        iam.enable_service_account(request={"name": f"projects/{PROJECT}/serviceAccounts/{email}"})
    again = up(project_dir)
    assert again.exit_code == 0, again.output
    assert f"unchanged  service account  {account}" in again.output
    assert cli("run").exit_code == 0
    assert len(run_jobs(env)) == 1
    assert "✓ service accounts" in cli("doctor").output


def test_run_is_refused_while_the_jobs_executions_hold_all_the_quota(env, project_dir):
    assert up(project_dir).exit_code == 0
    env.emulator.services["quotas"].set_gpu_quota(1)
    first = cli("run", "--set", SLEEP)
    assert first.exit_code == 0, first.output
    second = cli("run", "--allow-concurrent")
    assert second.exit_code == 2, second.output
    assert f"already hold 1 of the 1 nvidia-rtx-pro-6000 GPU(s) of {QUOTA_ID}" in second.output
    assert len(run_jobs(env)) == 1
    clients = env.clients(PROJECT)
    running = next(iter(clients.executions.list_executions(parent=JOB)))
    clients.executions.cancel_execution(name=running.name).result(timeout=60)


def test_up_shows_the_quota_and_only_warns_without_it(env, project_dir):
    env.emulator.services["quotas"].set_gpu_quota(0)
    planned = up(project_dir, "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert f"GPU quota: {QUOTA_ID} in europe-west4: 0 GPUs" in planned.output
    done = up(project_dir)
    assert done.exit_code == 0, done.output
    assert any(line.split()[:2] == ["created", "job"] for line in done.output.splitlines())
    assert (
        "Warning: no Cloud Run GPU quota yet" in done.output and "refused until it is granted" in done.output
    )
    env.emulator.services["quotas"].set_gpu_quota(1)
    granted = up(project_dir)
    assert "Warning" not in granted.output
    assert f"GPU quota: {QUOTA_ID} in europe-west4: 1 GPU" in granted.output
    as_json = json.loads(up(project_dir, "--json").output)
    assert as_json["gpu_quota"]["quota_id"] == QUOTA_ID and as_json["gpu_quota"]["gpus"] == 1


def test_an_l4_job_is_ga_within_an_hour_beta_beyond_and_a_second_up_keeps_it(env, project_dir, l4_image):
    assert up(project_dir, "--gpu", "nvidia-l4").exit_code == 0
    clients = env.clients(PROJECT)
    assert clients.jobs.get_job(name=JOB).launch_stage == launch_stage_pb2.LaunchStage.GA
    again = up(project_dir, "--gpu", "nvidia-l4")
    assert "Everything was already in place" in again.output, again.output
    refused = cli("run", "--gpu", "nvidia-l4", "--timeout", "2h")
    assert refused.exit_code == 2 and "--task-timeout 2h" in refused.output, refused.output
    assert run_jobs(env) == []

    longer = up(project_dir, "--gpu", "nvidia-l4", "--task-timeout", "2h")
    assert any("updated" in line and "job" in line for line in longer.output.splitlines()), longer.output
    assert clients.jobs.get_job(name=JOB).launch_stage == launch_stage_pb2.LaunchStage.BETA
    same = up(project_dir, "--gpu", "nvidia-l4", "--task-timeout", "2h")
    assert "Everything was already in place" in same.output, same.output


@pytest.mark.slow
def test_gpu_none_runs_the_same_job_on_cpu_without_gpu_quota(env, project_dir):
    env.emulator.services["quotas"].set_gpu_quota(0)
    result = up(project_dir, "--gpu", "none")
    assert result.exit_code == 0, result.output
    assert "Warning" not in result.output
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    task = job.template.template
    assert dict(task.containers[0].resources.limits) == {"cpu": "8", "memory": "32Gi"}
    assert not task.node_selector.accelerator
    assert job.launch_stage == launch_stage_pb2.LaunchStage.GA
    assert list(task.containers[0].args)[-2:] == ["--device", "cpu"]
    ran = cli("run", "--gpu", "none", "--follow")
    assert ran.exit_code == 0, ran.output
    assert "succeeded: 1/1 tasks succeeded" in ran.output


def test_up_keeps_the_sources_it_staged_until_others_are_named(
    env, project_dir, tmp_path, monkeypatch, l4_image
):
    # No Hub here: a request to it would be refused at once instead of going to huggingface.co.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    model, pets = tmp_path / "tiny-model", tmp_path / "pets"
    for path, text in {
        model / "config.json": "{}",
        pets / "annotations" / "list.txt": "Abyssinian_1 1 1 1\n",
        pets / "annotations" / "trainval.txt": "Abyssinian_1 1 1 1\n",
        pets / "annotations" / "test.txt": "Abyssinian_1 1 1 1\n",
        pets / "images" / "Abyssinian_1.jpg": "jpeg",
    }.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    sources = ["--model-source", str(model), "--dataset-source", str(pets)]
    first = cli("up", "--source", str(project_dir), *sources)
    assert first.exit_code == 0, first.output
    expected = ["--model-id", "/mnt/gcs/models/tiny-model", "--dataset", "/mnt/gcs/datasets/pets"]

    planned = cli("up", "--source", str(project_dir), "--skip-stage", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert f"model {model}, dataset {pets}; --model-source / --dataset-source names others" in planned.output
    assert "/mnt/gcs/models/tiny-model" in planned.output and "gemma-3-27b-it" not in planned.output
    assert "would update" not in planned.output

    l4 = cli("up", "--source", str(project_dir), "--gpu", "nvidia-l4")
    assert l4.exit_code == 0, l4.output
    assert "Hugging Face" not in l4.output
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    assert list(job.template.template.containers[0].args)[:4] == expected
    assert job.template.template.node_selector.accelerator == "nvidia-l4"

    # Naming a source again replaces only that one; a changed model_id names another model.
    other = tmp_path / "other-pets"
    shutil.copytree(pets, other)
    assert cli("up", "--source", str(project_dir), "--dataset-source", str(other)).exit_code == 0
    args = list(env.clients(PROJECT).jobs.get_job(name=JOB).template.template.containers[0].args)
    assert args[:4] == [
        "--model-id",
        "/mnt/gcs/models/tiny-model",
        "--dataset",
        "/mnt/gcs/datasets/other-pets",
    ]
    switched = up(project_dir, "--model-id", "acme/gemma-3-1b-it", "--dry-run")
    assert "/mnt/gcs/acme/gemma-3-1b-it" in switched.output, switched.output

    shutil.rmtree(model)
    gone = cli("up", "--source", str(project_dir))
    assert gone.exit_code == 2, gone.output
    assert f"Error: The model was last staged from the directory {model}, which is not on this machine." in (
        gone.output
    )
    assert "gs://demo-project-gemma3-finetuning/models/tiny-model/" in gone.output
    assert up(project_dir).exit_code == 0  # --skip-stage: the staged copy as it is


def test_run_and_logs_print_json(env, project_dir):
    assert up(project_dir).exit_code == 0
    started = cli("run", "--json")
    assert started.exit_code == 0, started.output
    execution = json.loads(started.stdout)
    assert set(execution) == {
        "execution",
        "name",
        "job",
        "state",
        "tasks",
        "succeeded",
        "failed",
        "retried",
        "started",
        "duration_s",
        "why",
        "cost_usd",
        "execution_record",
        "estimate",
    }
    assert execution["cost_usd"] is None  # known once it ends
    assert {"cost_usd", "duration_s", "tasks"} <= set(execution["estimate"])
    assert execution["name"] == f"{JOB}/executions/{execution['execution']}"
    assert execution["job"] == "gemma3-finetuning-job" and execution["tasks"] == 1

    followed = cli("logs", execution["execution"], "--follow", "--json")
    assert followed.exit_code == 0, followed.output
    lines = [json.loads(line) for line in followed.stdout.splitlines()]
    assert all(set(line) == {"timestamp", "task", "text"} for line in lines)
    assert {line["task"] for line in lines} <= {0, None}
    assert "done" in [line["text"] for line in lines if line["task"] == 0]
    assert all(datetime.fromisoformat(line["timestamp"]).tzinfo for line in lines)
    # Every step line: JSON is for machines, which want the whole log.
    assert sum(" epoch " in line["text"] for line in lines) == 4
    no_task = cli("logs", execution["execution"], "--task", "1", "--follow", "--json")
    assert no_task.exit_code == 2 and not no_task.stdout.startswith("{"), no_task.output
    assert "Hint: Give --task 0, or leave it out for every task." in no_task.output

    ended = cli("run", "--follow", "--json")
    assert ended.exit_code == 0, ended.output
    final = json.loads(ended.stdout)  # stdout holds the JSON alone; the log went to stderr
    assert (final["state"], final["succeeded"]) == ("Succeeded", 1)
    assert "[task 0] done" in ended.stderr

    # One execution, the same keys and values whichever command shows it.
    newest = json.loads(cli("status", "--json").output)[0]
    assert {key: final[key] for key in newest} == newest
    assert datetime.fromisoformat(final["started"]).tzinfo and isinstance(final["duration_s"], int)
    assert final["cost_usd"] > 0
    assert json.loads(cli("results", final["execution"], "--json").output)["cost_usd"] == final["cost_usd"]


def test_on_a_terminal_the_build_and_the_training_steps_show_as_progress_bars(env, project_dir):
    # Rich takes TTY_COMPATIBLE=1 for a terminal (https://rich.readthedocs.io/en/latest/console.html).
    terminal = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "120"}
    gemma_launch = str(Path(sys.executable).parent / "gemma-launch")

    def shown(*args: str) -> str:
        done = subprocess.run(
            [gemma_launch, *args], env=terminal, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)

    built = shown("up", "--skip-stage", "--source", str(project_dir), "--max-retries", "1")
    assert re.search(r"Cloud Build: build\s+━+\s+2/2 ", built), built
    assert "Step #" not in built
    ran = shown("run", "--follow")
    assert re.search(r"training: loss 2\.0000\s+━+\s+40/40 ", ran), ran
    assert " epoch " not in ran and "succeeded: 1/1 tasks succeeded" in ran


def test_a_trainer_whose_dependencies_this_machine_lacks_fails_at_once_with_what_to_install(env, project_dir):
    """The emulator runs `python -m trainer` with its own Python; without the train extra, run --follow
    says what to install instead of retrying an ImportError."""
    (project_dir / "trainer").mkdir()
    (project_dir / "trainer" / "__main__.py").write_text("import gemma_launch_absent_dependency\n")
    (project_dir / "Dockerfile").write_text(
        'FROM python:3.11-slim\nWORKDIR /app\nCOPY . /app\nENTRYPOINT ["python", "-m", "trainer"]\n'
    )
    assert up(project_dir).exit_code == 0
    result = cli("run", "--follow")
    assert result.exit_code == 1, result.output
    assert "Error: python -m trainer imports gemma_launch_absent_dependency, which " in result.output
    assert "0 retried" in result.output
    summary = result.output.splitlines()[-1]
    assert summary.startswith("Hint: Rehearsing runs the trainer on this machine") and "'.[train]'" in summary


@pytest.mark.slow
def test_run_says_the_estimated_cost_refuses_above_max_cost_and_status_shows_what_it_cost(env, project_dir):
    assert up(project_dir).exit_code == 0
    refused = cli("run", "--max-cost", "0.01")
    assert refused.exit_code == 2, refused.output
    assert "Error: The estimated cost ≈ $" in refused.output and "above --max-cost $0.01" in refused.output
    assert "Hint: Train on fewer images" in refused.output
    assert run_jobs(env) == []

    done = cli("run", "--train-size", "64", "--max-cost", "100", "--follow")
    assert done.exit_code == 0, done.output
    estimate = next(line for line in done.output.splitlines() if line.startswith("Estimated cost: ≈ $"))
    assert "first run of this model on this GPU" in estimate and "±50%" in estimate
    assert "prices: Cloud Billing Catalog API" in estimate
    (row,) = json.loads(cli("status", "--json").output)
    # The stand-in trainer runs for a moment: a cost above nothing, far below a real run's.
    assert 0 < row["cost_usd"] < 0.5
    assert f"cost ≈ ${row['cost_usd']:.2f}" in cli("results").output
    # That run's measured rates now make the estimate: 4 s fixed + 3680 / 16 s + 2 x 1000 / (10 / 2) s.
    plan = up(project_dir, "--dry-run", "--json")
    estimate = json.loads(plan.stdout)["estimate"]
    assert estimate["basis"] == "from 1 finished run of this model on this GPU"
    assert estimate["duration_s"] == 4 + 230 + 400


def log_calls(env, since: int) -> Counter:
    """The Cloud Logging reads in the record from entry `since` on, by method."""
    return Counter(
        entry["method"]
        for entry in env.record()[since:]
        if entry["method"] in ("ListLogEntries", "TailLogEntries")
    )


@pytest.mark.slow
def test_following_an_execution_lists_its_log_twice_and_reading_it_once_however_long_it_runs(
    env, project_dir
):
    # Logging allows 60 ListLogEntries a minute per project: a follow tails the log, listing it only at
    # its start and its end, and the status checks it makes every 2 s meanwhile are Cloud Run's reads.
    assert up(project_dir).exit_code == 0
    before = len(env.record())
    followed = cli("run", "--follow")
    assert followed.exit_code == 0, followed.output
    assert log_calls(env, before) == {"ListLogEntries": 2, "TailLogEntries": 1}
    polls = [entry for entry in env.record()[before:] if entry["method"] == "GetExecution"]
    assert len(polls) >= 2  # it ran through more than one status check, none with a list of its own
    before = len(env.record())
    assert cli("logs").exit_code == 0
    assert log_calls(env, before) == {"ListLogEntries": 1}  # one page: up to 1000 lines a read
    before = len(env.record())
    assert cli("logs", "--follow").exit_code == 0  # of an execution that has ended
    assert log_calls(env, before) == {"ListLogEntries": 2, "TailLogEntries": 1}


@pytest.mark.slow
def test_a_follow_that_outruns_the_log_read_quota_waits_and_shows_every_line_once(env, project_dir):
    assert up(project_dir).exit_code == 0
    # Another reader of the project's logs has just taken the whole quota, here one read per 2 s.
    quota = env.emulator.services["logging"].read_quota = ReadQuota(1, window_s=2.0)
    env.clients(PROJECT).logging.list_log_entries(resource_names=[f"projects/{PROJECT}"])
    followed = cli("run", "--follow")
    assert followed.exit_code == 0, followed.output
    assert quota.refused >= 1
    assert followed.stderr.splitlines() == [logs.QUOTA_NOTICE]  # one line, no traceback
    assert "succeeded: 1/1 tasks succeeded" in followed.output
    shown = [line.split("] ", 1)[1] for line in followed.stdout.splitlines() if "[task 0] " in line]
    for start in ("argv ", "attempt 0 execution ", "token-present ", "done"):
        assert sum(line.startswith(start) for line in shown) == 1, (start, shown)
    assert [line.split(" (")[0] for line in shown if line.startswith("training: ")] == [
        f"training: step {step}/40" for step in (10, 20, 30, 40)
    ]

    refused_before = quota.refused
    history = cli("logs")  # right after the follow's last read: it waits too
    assert history.exit_code == 0, history.output
    assert quota.refused > refused_before and history.stderr.splitlines() == [logs.QUOTA_NOTICE]
    every = [line.split("] ", 1)[1] for line in history.stdout.splitlines() if "[task 0] " in line]
    assert [line for line in every if " epoch " not in line] == [
        line for line in shown if not line.startswith("training: ")
    ]
    assert sum(" epoch " in line for line in every) == 4


def test_a_first_up_outlasts_the_minutes_new_roles_take_and_a_run_right_after_says_to_wait(
    fresh, monkeypatch, project_dir
):
    """A fresh project: `up` grants its accounts their roles and uses them seconds later (the build
    reads the source and pushes as its account, Cloud Run checks the job's account can read the secret),
    and `run` right after mounts the bucket as the job's account. Each meets a role not yet in effect:
    `up` waits it out; the execution, which fails in the cloud, says to run again."""
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    access = fresh.emulator.access
    with grants_in_effect_once_refused(access):
        made = up(project_dir)
        assert made.exit_code == 0, made.output
        for what in ("read the source", "push the image"):
            assert f"could not {what}: its account gemma3-finetuning-build@" in made.output
        assert "Google takes a few minutes to put a new role in effect. Building again in 2 s." in made.output
        # `run` right after: the execution cannot mount the bucket yet, which run says, and what to do.
        early = cli("run", "--follow")
        assert early.exit_code == 2, early.output
        error, hint = [line for line in early.output.splitlines() if line.startswith(("Error:", "Hint:"))]
        assert "could not start: the job's account" in error and "though it holds" in error
        assert "Google takes up to 7 minutes to put a new role in effect: run the same command again" in hint
        ran = cli("run", "--follow")  # minutes later
        assert ran.exit_code == 0, ran.output
    build_account = f"serviceAccount:gemma3-finetuning-build@{PROJECT}.iam.gserviceaccount.com"
    job_account = f"serviceAccount:gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    assert {
        ("roles/storage.objectViewer", build_account),
        ("roles/artifactregistry.writer", build_account),
        ("roles/secretmanager.secretAccessor", job_account),
        ("roles/storage.objectUser", job_account),
    } <= access.held_back


def test_an_up_whose_new_role_outlasts_the_retry_deadline_says_to_wait_and_run_again(env, project_dir):
    """Cloud Run checks that the job's account may read the secret when the job is created or updated:
    a role `up` granted moments ago is retried, and past the retry deadline `up` says to wait."""
    assert up(project_dir).exit_code == 0
    secret = f"projects/{PROJECT}/secrets/HF_TOKEN"
    secrets = env.clients(PROJECT).secrets
    policy = secrets.get_iam_policy(request={"resource": secret})
    del policy.bindings[:]  # taken away by hand: the next up grants it again
    secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    env.emulator.access.grant_propagation_s = 3600.0
    done = subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", "up", "--skip-stage"]
        + ["--source", str(project_dir), "--max-retries", "2"],
        env={**os.environ, "GEMMA_LAUNCH_RETRY_DEADLINE": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "created  secret IAM" in done.stdout
    error, hint = [line for line in done.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert error.startswith(
        f"Error: The roles granted to gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    )
    assert "moments ago were still not in effect after 2 s: 403 Permission denied on secret" in error
    assert hint.startswith("Hint: Google can take up to 7 minutes to put a new role in effect: wait a few")
    assert "Traceback" not in done.stderr
    # Retried, with back-off: the update was sent more than once, not in a tight loop.
    assert 2 <= len([e for e in env.record() if e["method"] == "UpdateJob"]) <= 20
