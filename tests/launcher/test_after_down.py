"""What a user reads of past executions once `down` deleted the job (and their records with it), and once
`up` made the job again: results, report, logs, status and cancel, from the bucket and Cloud Logging.

Real clients, the emulator, the CLI as a user runs it; the job runs a stand-in trainer (as tests/launcher/
test_down.py does)."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher import past_runs
from launcher.cli import main
from launcher.settings_sources import load_settings
from tests.support.image_source import image_source

PROJECT = "demo-project"
TOKEN = "hf_after_down_test_token_0123456789ab"
BUCKET = f"{PROJECT}-gemma3-finetuning"

# Writes results and logs a line; with --seed 7 it stops as the trainer does on an error a retry cannot
# fix: failure.json (trainer/failure.py) and exit 2.
STAND_IN = textwrap.dedent(
    """
    import json, os, pathlib, sys

    flags = dict(zip(*[iter(sys.argv[1:])] * 2))
    out = pathlib.Path(flags["--output-dir"]) / os.environ["CLOUD_RUN_EXECUTION"]
    out.mkdir(parents=True, exist_ok=True)
    if flags.get("--seed") == "7":
        failure = {"error": "image 12 cannot be decoded.", "hint": "Remove it from the dataset."}
        (out / "failure.json").write_text(json.dumps(failure))
        print("Error: image 12 cannot be decoded.", flush=True)
        sys.exit(2)
    print("stand-in trained on every pet", flush=True)
    results = {"baseline": {"accuracy": 0.1, "macro_f1": 0.05}, "final": {"accuracy": 0.8, "macro_f1": 0.75}}
    (out / "results.json").write_text(json.dumps(results))
    """
)


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    return image_source(tmp_path / "stand-in", ["python", "trainer.py"], {"trainer.py": STAND_IN})


@pytest.fixture
def env(local, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return local


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def up(project_dir: Path) -> None:
    result = cli("up", "--skip-stage", "--source", str(project_dir), "--max-retries", "0")
    assert result.exit_code == 0, result.output


def execution_of(output: str) -> str:
    return re.search(r"Execution (\S+) (?:succeeded|failed)", output).group(1)


@pytest.mark.slow
def test_after_down_and_after_up_again_past_runs_are_read_from_the_bucket_and_cloud_logging(env, project_dir):
    up(project_dir)
    failed_run = cli("run", "--set", "seed=7", "--follow")
    assert failed_run.exit_code == 2, failed_run.output
    failed = execution_of(failed_run.output)
    good_run = cli("run", "--follow")
    assert good_run.exit_code == 0, good_run.output
    good = execution_of(good_run.output)
    assert cli("down").exit_code == 0

    gone = (
        f"execution record gone (job gemma3-finetuning-job deleted); results from gs://{BUCKET}/runs/{good}/"
    )
    newest = cli("results")  # the newest run the bucket keeps
    assert newest.exit_code == 0, newest.output
    assert newest.output.splitlines()[0] == f"Execution {good}: {gone}"
    assert "Accuracy" in newest.output and "80.0%" in newest.output and "+70.0 pp" in newest.output
    as_json = json.loads(cli("results", good, "--json").output)
    assert as_json["final"]["accuracy"] == 0.8
    assert as_json["execution_record"] is False and as_json["cost_usd"] is None

    no_results = cli("results", failed)
    assert no_results.exit_code == 2
    assert "Error: Execution " + failed + " failed, so it has no results" in no_results.output
    assert "image 12 cannot be decoded" in no_results.output
    assert "Hint: Remove it from the dataset." in no_results.output

    page = cli("report", good)
    assert page.exit_code == 0, page.output
    assert "execution record gone (job gemma3-finetuning-job deleted)" in page.output
    assert Path(f"report-{good}.html").is_file()

    log = cli("logs", good)
    assert log.exit_code == 0, log.output
    assert "[task 0] stand-in trained on every pet" in log.stdout
    assert "execution record gone" in log.stderr and "its log from Cloud Logging" in log.stderr
    assert cli("logs", failed, "--follow").exit_code == 1  # its exit status: how the bucket says it ended
    assert cli("logs", good, "--follow").exit_code == 0

    status = cli("status", "--json")
    assert status.exit_code == 0, status.output
    rows = {row["execution"]: row for row in json.loads(status.output)}
    assert {name: (row["state"], row["execution_record"]) for name, row in rows.items()} == {
        good: ("Succeeded", False),
        failed: ("Failed", False),
    }
    assert rows[failed]["why"] == "image 12 cannot be decoded."  # what its trainer recorded
    table = cli("status")
    assert "Job gemma3-finetuning-job does not exist in europe-west4" in table.output
    assert f"{failed} failed: image 12 cannot be decoded." in table.output
    assert "execution record gone (job gemma3-finetuning-job deleted)" in table.output

    cancel = cli("cancel", good)
    assert cancel.exit_code == 0 and "nothing to cancel" in cancel.output
    typo = cli("results", "typo1")
    assert typo.exit_code == 2
    assert typo.output.splitlines() == [
        "Error: Execution typo1 of job gemma3-finetuning-job (which does not exist now) "
        f"does not exist, and gs://{BUCKET}/runs/typo1/ holds nothing of it.",
        f"Hint: Runs the bucket keeps without a record, newest first: {good}, {failed}.",
    ]

    # A job made again has none of the old executions: the bucket still has their runs.
    up(project_dir)
    again = cli("results")
    assert again.exit_code == 0, again.output
    assert (
        f"Execution {good}: execution record gone (job gemma3-finetuning-job keeps no record of it)"
        in again.output
    )
    assert "stand-in trained on every pet" in cli("logs").stdout
    status = cli("status")
    assert "has no executions yet" in status.output and good in status.output and failed in status.output

    # Its own executions come first again, with their records.
    assert cli("run", "--follow").exit_code == 0
    latest = json.loads(cli("results", "--json").output)
    assert latest["execution_record"] is True
    rows = json.loads(cli("status", "--json").output)
    assert [row["execution_record"] for row in rows] == [True, False, False]
    assert [row["execution"] for row in rows][1:] == [good, failed]


def test_with_no_job_and_no_run_in_the_bucket_each_command_says_where_it_looked(env):
    hint = "Hint: Run `gemma-launch up`, then `gemma-launch run` (give --bucket if `up` used another bucket)."
    no_job = "Error: Job gemma3-finetuning-job does not exist in europe-west4, and "
    for args in (["status"], ["results"], ["report"], ["logs"]):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.splitlines() == [
            f"{no_job}bucket gs://{BUCKET} does not exist (`down --delete-bucket` deletes it).",
            hint,
        ]
    named = cli("logs", "abcde")
    assert named.exit_code == 2
    assert named.output.splitlines()[0] == (
        "Error: Execution abcde of job gemma3-finetuning-job (which does not exist now) does not exist, "
        f"and bucket gs://{BUCKET} does not exist (`down --delete-bucket` deletes it); nor does Cloud "
        "Logging hold a line of it."
    )

    clients = env.clients(PROJECT)
    clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    result = cli("results")
    assert result.output.splitlines() == [f"{no_job}gs://{BUCKET}/runs/ holds no earlier run.", hint]


def test_the_bucket_lists_its_runs_newest_first_with_the_state_their_files_say(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    job = "gemma3-finetuning-job"
    for name in (
        f"runs/{job}-aaaaa/results.json",
        f"runs/{job}-aaaaa/adapter_model.safetensors",
        f"runs/{job}-bbbbb/failure.json",
        f"runs/{job}-ccccc/task-0/results.json",
        f"runs/{job}-ccccc/task-2/results.json",
        f"runs/{job}-ddddd/checkpoint-10/trainer_state.json",
        "runs/.cache/warm-start/k/results.json",
        "runs/other-job-eeeee/results.json",  # another job's, sharing the bucket
    ):
        bucket.blob(name).upload_from_string("{}")
    settings = load_settings(flags={"project_id": PROJECT})

    kept = past_runs.kept(clients, settings)
    assert [(run.name, run.state, run.tasks_with_results) for run in kept] == [
        (f"{job}-ccccc", "Succeeded", (0, 2)),
        (f"{job}-bbbbb", "Failed", ()),
        (f"{job}-aaaaa", "Succeeded", ()),
    ]
    # A run that wrote neither file yet is still the bucket's: how it ended is unknown.
    assert past_runs.kept_one(clients, settings, f"{job}-ddddd").state == "Unknown"
    assert past_runs.kept_one(clients, settings, f"{job}-zzzzz") is None
    assert past_runs.kept_one(clients, settings, "other-job-eeeee").state == "Succeeded"  # named: found


def test_a_sweep_whose_record_is_gone_is_ranked_and_reported_from_its_tasks_results(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    flags = {"sweep-grid": "learning-rate=1e-4,2e-4,5e-4", "seed": 42}
    for index, accuracy in ((0, 0.6), (1, 0.9)):  # task 2 wrote nothing
        results = {
            "baseline": {"accuracy": 0.1, "macro_f1": 0.1, "unknown_rate": 0.0},
            "final": {"accuracy": accuracy, "macro_f1": accuracy - 0.05, "unknown_rate": 0.0},
            "settings": {"flags": flags},
        }
        bucket.blob(f"runs/sweep-x/task-{index}/results.json").upload_from_string(json.dumps(results))

    shown = cli("results", "sweep-x", "--json")
    assert shown.exit_code == 0, shown.output
    assert [(row["label"], row["settings"], row["state"]) for row in json.loads(shown.output)] == [
        ("task 1", {"learning-rate": "2e-4"}, "Succeeded"),
        ("task 0", {"learning-rate": "1e-4"}, "Succeeded"),
        ("task 2", {"learning-rate": "5e-4"}, "Unknown"),
    ]
    table = cli("results", "sweep-x")
    assert table.exit_code == 0, table.output
    assert table.output.splitlines()[0] == (
        "Execution sweep-x: execution record gone (job gemma3-finetuning-job deleted); its tasks' results "
        f"from gs://{BUCKET}/runs/sweep-x/"
    )
    assert "Sweep sweep-x" in table.output and "10.0% -> 90.0%" in table.output

    run = {
        "baseline": {"accuracy": 0.1, "macro_f1": 0.1, "unknown_rate": 0.0},
        "final": {"accuracy": 0.7, "macro_f1": 0.6, "unknown_rate": 0.0},
        "settings": {"flags": {"learning-rate": 1e-3, "seed": 42, "output-dir": "/mnt/gcs/runs"}},
    }
    bucket.blob("runs/run-y/results.json").upload_from_string(json.dumps(run))
    env.record_path.write_text("")
    compared = cli("results", "sweep-x", "run-y", "--json")
    assert compared.exit_code == 0, compared.output
    # Each results.json read once: the best task's flags come from the read that ranked it.
    read = [e["request"]["params"]["object_id"] for e in env.record() if e["method"] == "objects.get"]
    assert sorted(read) == [
        "runs/run-y/results.json",
        "runs/sweep-x/task-0/results.json",
        "runs/sweep-x/task-1/results.json",
    ]
    assert [
        (row["label"], row["settings"], row["final"]["accuracy"]) for row in json.loads(compared.output)
    ] == [
        ("sweep-x (task 1)", {"learning-rate": "0.0002"}, 0.9),
        ("run-y", {"learning-rate": "0.001"}, 0.7),
    ]

    page = cli("report", "sweep-x")
    assert page.exit_code == 0, page.output
    html = Path("report-sweep-x.html").read_text()
    assert "sweep-x task 1 (learning-rate=2e-4)" in html and "sweep-x task 0 (learning-rate=1e-4)" in html
