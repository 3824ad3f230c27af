"""What a user reads of past executions once `down` deleted the job (and their records with it), and once
`up` made the job again: results, report, logs, status and cancel, from the bucket and Cloud Logging.

Real clients, the emulator, the CLI as a user runs it; the job runs a stand-in trainer (as tests/launcher/
test_down.py does)."""

from __future__ import annotations

import json
import re
import textwrap
import webbrowser
from datetime import UTC, datetime, timedelta
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
        f"from gs://{BUCKET}/runs/sweep-x/; durations and costs estimated from results.json (its start, else "
        "its phases) at its region's prices: a lower bound (no container start, upload or earlier attempt)"
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
    # Each results.json downloaded once: the best task's flags come from the read that ranked it. (A run's
    # metadata read, for when the bucket wrote its results, is not a download.)
    read = [
        e["request"]["params"]["object_id"]
        for e in env.record()
        if e["method"] == "objects.get" and e["request"]["query"].get("alt") == ["media"]
    ]
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


def test_report_open_says_so_when_no_browser_opens_the_page(env, monkeypatch):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    results = {"baseline": {"accuracy": 0.1, "macro_f1": 0.1}, "final": {"accuracy": 0.7, "macro_f1": 0.6}}
    bucket.blob("runs/run-y/results.json").upload_from_string(json.dumps(results))
    # A machine reached over SSH: the one browser there is, `false`, opens nothing.
    monkeypatch.setenv("BROWSER", "false")
    monkeypatch.setattr(webbrowser, "_tryorder", None)
    page = CliRunner().invoke(main, ["report", "run-y", "--open"])
    assert page.exit_code == 0, page.output
    assert Path("report-run-y.html").is_file()
    assert page.stderr.splitlines()[-1] == (
        "No web browser opened it here: copy report-run-y.html to a machine with one, or open it there."
    )


# A run as the trainer records it on an RTX PRO 6000 (docs/trainer.md, "results.json"): 1000 s of phases,
# the GPU its platform line names, its model and measured rates (8 training samples/s; 200 images
# evaluated in 200 s; 300 s of load, image features, memory plan and save). With --seed 7 it fails as
# STAND_IN does.
MEASURED = textwrap.dedent(
    """
    import json, os, pathlib, sys

    flags = dict(zip(*[iter(sys.argv[1:])] * 2))
    out = pathlib.Path(flags["--output-dir"]) / os.environ["CLOUD_RUN_EXECUTION"]
    out.mkdir(parents=True, exist_ok=True)
    if flags.get("--seed") == "7":
        (out / "failure.json").write_text(json.dumps({"error": "image 12 cannot be decoded.", "hint": ""}))
        sys.exit(2)
    results = {
        "model_id": flags["--model-id"],
        "eval_size": 100,
        "baseline": {"accuracy": 0.1, "macro_f1": 0.05},
        "final": {"accuracy": 0.8, "macro_f1": 0.75},
        "train": {"steps": 10, "runtime_s": 500.0, "samples_per_s": 8.0},
        "platform": "torch 2.13.0 (CUDA 13.0), NVIDIA driver 580.95.05, NVIDIA RTX PRO 6000 Blackwell "
        "Server Edition (sm_120), Python 3.12.3",
        "phases": {"load_s": 150.0, "image_features_s": 50.0, "baseline_s": 100.0, "memory_plan_s": 50.0,
                   "train_s": 500.0, "final_eval_s": 100.0, "save_s": 50.0},
    }
    (out / "results.json").write_text(json.dumps(results))
    """
)
# The catalog's prices of the default shape: 20 vCPU, 80 GiB, an RTX PRO 6000 (tests/launcher/test_cost.py).
PER_SECOND = 20 * 0.000018 + 80 * 0.000002 + 0.0005


@pytest.mark.slow
def test_after_down_a_runs_cost_is_rebuilt_from_its_results_and_calibrates_the_next_estimate(env, tmp_path):
    source = image_source(tmp_path / "measured", ["python", "trainer.py"], {"trainer.py": MEASURED})
    up(source)
    failed = execution_of(cli("run", "--set", "seed=7", "--follow").output)
    done = cli("run", "--follow")
    assert done.exit_code == 0, done.output
    good = execution_of(done.output)
    assert cli("down").exit_code == 0

    rows = {row["execution"]: row for row in json.loads(cli("status", "--json").output)}
    clients = env.clients(PROJECT)
    written = clients.storage.bucket(BUCKET).get_blob(f"runs/{good}/results.json").updated
    # The phases' 1000 s, ending when the bucket wrote results.json, at the prices of the GPU it names.
    assert rows[good]["execution_record"] is False
    assert rows[good]["duration_s"] == 1000
    assert rows[good]["started"] == (written - timedelta(seconds=1000)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[good]["cost_usd"] == pytest.approx(1000 * PER_SECOND)
    # A failed run wrote no timings: nothing is made up.
    assert (rows[failed]["started"], rows[failed]["duration_s"], rows[failed]["cost_usd"]) == (
        None,
        None,
        None,
    )
    table = cli("status").output
    assert re.search(rf"{good} .*≈ 0h16m40s .*≈ \$1\.02", table), table
    assert re.search(rf"{failed} .*unknown .*unknown .*unknown", table), table
    assert "starts, durations and costs (≈) estimated from results.json (its start, else its phases)" in table
    assert f"{failed}: started, duration and cost not known: it wrote no results.json" in table

    assert json.loads(cli("results", good, "--json").output)["cost_usd"] == pytest.approx(1000 * PER_SECOND)
    assert "cost ≈ $1.02, ran ≈ 0h16m40s (estimated from results.json" in cli("results", good).output
    # `report` shows the same estimate on the page.
    assert cli("report", good).exit_code == 0
    assert "≈ $1.02, ran ≈ 0h16m40s (estimated from results.json" in Path(f"report-{good}.html").read_text()

    # After `up`, the job has no execution: the estimate still learns from the run the bucket keeps, with
    # one listing of the bucket: 300 s + 3680 / 8 s of training + 2 x 1000 / 1 s of evaluation.
    up(source)

    def estimate() -> dict:
        plan = cli("up", "--skip-stage", "--source", str(source), "--dry-run", "--json")
        assert plan.exit_code == 0, plan.output
        return json.loads(plan.stdout)["estimate"]

    before = len(env.record())
    plan = estimate()
    assert plan["basis"] == (
        "from 1 finished run of this model on this GPU (1 of them from the bucket, without a record)"
    )
    assert plan["duration_s"] == 300 + 460 + 2000
    listings = [entry for entry in env.record()[before:] if entry["method"] == "objects.list"]
    assert len(listings) == 1, listings
    # A run with both a record and results counts once.
    assert cli("run", "--follow").exit_code == 0
    plan = estimate()
    assert plan["basis"] == (
        "from 2 finished runs of this model on this GPU (1 of them from the bucket, without a record)"
    )


def test_the_estimator_learns_from_the_newest_runs_the_bucket_keeps_not_the_first_names(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    job = "gemma3-finetuning-job"
    # Cloud Run's execution suffixes are random: the bucket's alphabetical listing is no order in time.
    for suffix in ("aaaaa", "mmmmm", "zzzzz"):  # written oldest first
        bucket.blob(f"runs/{job}-{suffix}/results.json").upload_from_string(json.dumps({"run": suffix}))
    bucket.blob(f"runs/{job}-bbbbb/task-0/results.json").upload_from_string(json.dumps({"run": "task"}))
    settings = load_settings(flags={"project_id": PROJECT})

    assert [run["run"] for run in past_runs.finished(clients, settings, 2, set())] == ["zzzzz", "mmmmm"]
    assert [run["run"] for run in past_runs.finished(clients, settings, 2, {f"{job}-zzzzz"})] == [
        "mmmmm",
        "aaaaa",
    ]


def test_a_sweeps_tasks_costs_are_rebuilt_from_their_results_and_what_they_do_not_tell_is_unknown(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    job = "gemma3-finetuning-job"
    # Task 0 as the emulator runs it, on its CPU with the budget the launcher gives an RTX PRO 6000; task 1
    # on the GPU itself, which its platform line names. Their phases: 100 s and 200 s.
    on_cpu = {"platform": "torch 2.13.0 (CUDA none), NVIDIA driver none, no GPU visible, Python 3.12.3"}
    on_gpu = {
        "platform": "torch 2.13.0 (CUDA 13.0), NVIDIA driver 580, NVIDIA RTX PRO 6000 (sm_120), Python 3"
    }
    for name, grid, tasks in (
        (f"{job}-swp01", "seed=1,2", ((on_cpu, 100.0), (on_gpu, 200.0))),
        (f"{job}-swp02", "seed=1,2,3", ((on_cpu, 100.0), (on_gpu, 200.0))),  # task 2 wrote nothing
    ):
        for index, (where, seconds) in enumerate(tasks):
            results = {
                "baseline": {"accuracy": 0.1, "macro_f1": 0.1, "unknown_rate": 0.0},
                "final": {"accuracy": 0.5 + index / 10, "macro_f1": 0.5, "unknown_rate": 0.0},
                "phases": {"load_s": seconds / 2, "train_s": seconds / 2},
                "settings": {"flags": {"sweep-grid": grid, "max-memory-gib": 85}},
                **where,
            }
            bucket.blob(f"runs/{name}/task-{index}/results.json").upload_from_string(json.dumps(results))
    older = {"final": {"accuracy": 0.7}, **on_gpu}  # an older trainer's: no phases
    bucket.blob(f"runs/{job}-old01/results.json").upload_from_string(json.dumps(older))
    elsewhere = {"final": {"accuracy": 0.7}, "phases": {"train_s": 50.0}, "platform": "NVIDIA L40S (sm_89)"}
    bucket.blob(f"runs/{job}-l40s1/results.json").upload_from_string(json.dumps(elsewhere))

    board = {row["task"]: row for row in json.loads(cli("results", f"{job}-swp02", "--json").output)}
    assert [(board[i]["duration_s"], board[i]["cost_usd"]) for i in (0, 1)] == [
        (100, pytest.approx(100 * PER_SECOND)),
        (200, pytest.approx(200 * PER_SECOND)),
    ]
    assert (board[2]["duration_s"], board[2]["cost_usd"]) == (None, None)
    table = cli("results", f"{job}-swp02").output
    assert "durations and costs estimated from results.json (its start, else" in table.splitlines()[0]
    assert re.search(r"task 2 .* Unknown .* unknown .* unknown", table), table

    rows = {row["execution"]: row for row in json.loads(cli("status", "--json").output)}
    # A sweep's tasks run side by side: from the first one's start to the last one's end, the sum of costs.
    written = [bucket.get_blob(f"runs/{job}-swp01/task-{i}/results.json").updated for i in (0, 1)]
    first = min(written[0] - timedelta(seconds=100), written[1] - timedelta(seconds=200))
    assert rows[f"{job}-swp01"]["started"] == first.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert rows[f"{job}-swp01"]["duration_s"] == round((max(written) - first).total_seconds())
    assert rows[f"{job}-swp01"]["cost_usd"] == pytest.approx(300 * PER_SECOND)
    for name in (f"{job}-swp02", f"{job}-old01"):
        assert (rows[name]["started"], rows[name]["duration_s"], rows[name]["cost_usd"]) == (None, None, None)
    # A GPU Cloud Run does not offer has no price here; its duration is still what its phases say.
    assert (rows[f"{job}-l40s1"]["duration_s"], rows[f"{job}-l40s1"]["cost_usd"]) == (50, None)
    # Its report page shows what `results` shows; a sweep's, each task's.
    assert cli("report", f"{job}-l40s1").exit_code == 0
    assert "ran ≈ 0h00m50s; cost not known" in Path(f"report-{job}-l40s1.html").read_text()
    assert cli("report", f"{job}-swp01").exit_code == 0
    page = Path(f"report-{job}-swp01.html").read_text()
    for seconds in (100, 200):
        assert (
            f"≈ ${seconds * PER_SECOND:.2f}, ran ≈ 0h0{seconds // 60}m{seconds % 60:02d}s (estimated" in page
        )
    unpriced = "cost not known: its results.json names no GPU that Cloud Run offers"
    assert f"ran ≈ 0h00m50s; {unpriced}" in cli("results", f"{job}-l40s1").output
    status = cli("status").output
    assert f"{job}-l40s1: {unpriced}" in status
    assert (
        f"{job}-swp02: started, duration and cost not known: 1 of its 3 tasks wrote no results.json" in status
    )
    assert (
        f"{job}-old01: started, duration and cost not known: its results.json records no phases (an older "
        "trainer's)" in status
    )


def test_a_run_that_recorded_its_start_and_region_is_timed_from_that_start_at_that_regions_prices(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.create_bucket(clients.storage.bucket(BUCKET), location="europe-west4")
    job = "gemma3-finetuning-job"
    # The GPU costs twice as much in us-central1, where the run ran, as in europe-west4, the settings'.
    gpu = "Jobs Nvidia RTX PRO 6000 GPU without zonal redundancy in us-central1"
    (sku,) = [sku for sku in env.emulator.services["catalog"].skus if sku.description == gpu]
    sku.pricing_info[0].pricing_expression.tiered_rates[-1].unit_price.nanos = 1_000_000
    there = 20 * 0.000018 + 80 * 0.000002 + 0.001
    # 1000 s of phases, after 500 s of checks and the dataset's download that only its start counts.
    started = (datetime.now(UTC) - timedelta(seconds=1500)).replace(microsecond=0)
    results = {
        "final": {"accuracy": 0.8},
        "platform": "torch 2.13.0 (CUDA 13.0), NVIDIA driver 580, NVIDIA RTX PRO 6000 (sm_120), Python 3",
        "phases": {"load_s": 400.0, "train_s": 600.0},
        "started": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": "us-central1",
    }
    bucket.blob(f"runs/{job}-rec01/results.json").upload_from_string(json.dumps(results))
    seconds = (bucket.get_blob(f"runs/{job}-rec01/results.json").updated - started).total_seconds()
    assert seconds >= 1500

    (row,) = json.loads(cli("status", "--json").output)
    assert (row["started"], row["duration_s"]) == (results["started"], round(seconds))
    assert row["cost_usd"] == pytest.approx(seconds * there)
    assert json.loads(cli("results", "--json").output)["cost_usd"] == pytest.approx(seconds * there)
    shown = f"≈ ${seconds * there:.2f}, ran ≈ 0h{int(seconds) // 60}m{int(seconds) % 60:02d}s (estimated"
    assert f"cost {shown} from results.json (its start, else its phases)" in cli("results").output
    # `report` shows the same estimate, as `results` marks it.
    page = cli("report")
    assert page.exit_code == 0, page.output
    assert shown in Path(f"report-{job}-rec01.html").read_text()
