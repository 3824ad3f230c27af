"""`sweep`: one execution, a task per combination of a grid, each checked before anything starts;
`results` ranks a sweep's tasks and compares executions; `logs --task` shows one task."""

from __future__ import annotations

import json
import re
import shlex
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from tests.launcher.test_run import FAKE_TRAINER, JOB, PROJECT, TOKEN
from tests.support.image_source import image_source
from trainer import sweep as trainer_sweep
from trainer.flags import parse_args
from trainer.sweep import TASK_INDEX

BUCKET = f"{PROJECT}-gemma3-finetuning"


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def fake_project(root: Path) -> Path:
    """A project whose image runs the fake trainer of test_run.py (fast, one results.json per run)."""
    return image_source(root, ["python", "fake_trainer.py"], {"fake_trainer.py": FAKE_TRAINER})


@pytest.fixture
def env(local, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return local


def started(env) -> list[str]:
    return [entry["method"] for entry in env.record() if entry["method"] in ("RunJob", "UpdateJob")]


def test_grid_values_are_checked_as_run_set_checks_them(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    cases = [
        (["--grid", "learning-rate=1e-4,abc"], "Error: Invalid --grid learning-rate=abc: must be a positive"),
        (["--grid", "learning_rate=1e-4"], "setting 'learning_rate' (--grid learning_rate=1e-4)."),
        (["--grid", "lora-r=8,,16"], "Error: --grid 'lora-r=8,,16' is not KEY=VALUE,VALUE,..."),
        (["--grid", "lora-r=8", "--grid", "lora-r=16"], "Error: --grid lora-r is given twice."),
        (["--grid", "lora-r=8,8"], "Error: --grid lora-r=8,8 repeats a value."),
        (["--grid", "lora-r=8,16", "--set", "lora-r=4"], "Error: lora-r is both a --set (lora-r=4) and"),
        (["--grid", "output-dir=/a,/b"], "Error: --grid output-dir=/a: output-dir is not a setting"),
        (["--grid", "sweep-grid=a"], "Error: --grid sweep-grid=a: sweep-grid is not a setting"),
    ]  # fmt: skip
    for args, error in cases:
        result = cli("sweep", *args)
        assert result.exit_code == 2, (args, result.output)
        assert error in result.output, (args, result.output)
        assert "Hint: " in result.output and "Traceback" not in result.output
        # A dry run refuses it in the same words: one that passes means the sweep gets past its checks.
        dry = cli("sweep", *args, "--dry-run")
        assert (dry.exit_code, dry.output) == (2, result.output), args
    both = cli("sweep", "--grid", "lora-r=8,16", "--dry-run", "--follow")
    assert both.exit_code == 2 and "Error: --follow and --dry-run together" in both.output
    did_you_mean = cli("sweep", "--grid", "learning_rate=1e-4")
    assert "Hint: Did you mean learning-rate?" in did_you_mean.output
    # `run` refuses the flag the sweep sets, naming the command that sets it.
    refused = cli("run", "--set", "sweep-grid=lora-r=8,16")
    assert "Hint: Run `gemma-launch sweep --grid KEY=VALUE,VALUE ...`" in refused.output


def test_more_parallelism_than_the_gpu_quota_is_refused_before_anything_starts(env, tmp_path):
    project = fake_project(tmp_path / "fake-project")
    assert cli("up", "--skip-stage", "--source", str(project)).exit_code == 0
    env.record_path.write_text("")

    over = cli("sweep", "--grid", "learning-rate=1e-4,2e-4,5e-4", "--parallelism", "3")
    assert over.exit_code == 2, over.output
    dry = cli("sweep", "--grid", "learning-rate=1e-4,2e-4,5e-4", "--parallelism", "3", "--dry-run")
    assert (dry.exit_code, dry.output) == (2, over.output)
    assert (
        "Error: --parallelism 3 needs 3 nvidia-rtx-pro-6000 GPUs at once; "
        "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion in europe-west4: 2 GPUs leaves 2"
    ) in over.output
    assert "Hint: Use --parallelism 2 or leave it out" in over.output
    # More than the sweep's tasks asks only for as many GPUs as it has tasks.
    fewer = cli("sweep", "--grid", "learning-rate=1e-4,2e-4", "--parallelism", "3", "--dry-run")
    assert fewer.exit_code == 0, fewer.output
    assert fewer.output.startswith("2 tasks, 2 at a time (--parallelism, within "), fewer.output

    env.emulator.services["quotas"].set_gpu_quota(0)
    none = cli("sweep", "--grid", "learning-rate=1e-4,2e-4")
    assert none.exit_code == 2, none.output
    assert "Error: The project has no Cloud Run GPU quota for nvidia-rtx-pro-6000" in none.output
    dry = cli("sweep", "--grid", "learning-rate=1e-4,2e-4", "--dry-run")
    assert (dry.exit_code, dry.output) == (2, none.output)
    assert started(env) == []
    job = env.clients(PROJECT).jobs.get_job(name=JOB)
    assert job.template.parallelism == 1


def test_a_sweep_is_one_execution_of_a_task_per_combination_as_many_at_once_as_the_quota_allows(
    env, tmp_path
):
    project = fake_project(tmp_path / "fake-project")
    assert cli("up", "--skip-stage", "--source", str(project)).exit_code == 0
    env.record_path.write_text("")

    sweep = cli("sweep", "--grid", "learning-rate=0.125,0.25", "--set", "lora-r=8", "--follow")
    assert sweep.exit_code == 0, sweep.output
    assert (
        "2 tasks, 2 at a time (what the GPU quota allows: "
        "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion in europe-west4: 2 GPUs)."
    ) in sweep.output
    assert "2/2 tasks succeeded" in sweep.output
    # Following tails the log and lists it twice, at its start and end, however many tasks log into it:
    # far inside Logging's 60 ListLogEntries a minute.
    reading = ("ListLogEntries", "TailLogEntries")
    log_reads = [call["method"] for call in env.record() if call["method"] in reading]
    assert sorted(log_reads) == ["ListLogEntries", "ListLogEntries", "TailLogEntries"]
    name = re.search(r"Started execution (\S+)", sweep.output)[1]
    execution = env.clients(PROJECT).executions.get_execution(name=f"{JOB}/executions/{name}")
    assert (execution.task_count, execution.parallelism) == (2, 2)
    args = list(execution.template.containers[0].args)
    assert args[args.index("--sweep-grid") + 1] == "learning-rate=0.125,0.25"
    assert args[args.index("--lora-r") + 1] == "8"
    # Parallelism is the job's, and Cloud Run holds it to the job's own task count: both are set for the
    # RunJob, then put back, so `up` finds the job as it left it.
    assert started(env) == ["UpdateJob", "RunJob", "UpdateJob"]
    template = env.clients(PROJECT).jobs.get_job(name=JOB).template
    assert (template.task_count, template.parallelism) == (1, 1)

    one = cli("logs", name, "--task", "1")
    assert one.exit_code == 0, one.output
    lines = one.output.splitlines()
    assert lines and all("[task 1] " in line for line in lines), one.output
    assert any(" argv " in line for line in lines)
    for follow in ([], ["--follow"], ["--follow", "--json"]):
        missing = cli("logs", name, "--task", "2", *follow)
        assert missing.exit_code == 2, (follow, missing.output)
        assert missing.output.startswith(f"Error: Execution {name} has 2 task(s): there is no task 2.\n")
        assert "Hint: Give --task 0 to 1, or leave it out for every task." in missing.output


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("Error: ", "Hint: "))]


def test_a_dry_run_shows_each_task_its_arguments_and_the_estimate_and_changes_nothing(env, tmp_path):
    project = fake_project(tmp_path / "fake-project")
    assert cli("up", "--skip-stage", "--source", str(project)).exit_code == 0
    assert cli("run", "--follow").exit_code == 0  # an execution to find unchanged, and a finished run's rates
    clients = env.clients(PROJECT)
    before = [found.name for found in clients.executions.list_executions(parent=JOB)]
    generation = clients.jobs.get_job(name=JOB).generation
    env.record_path.write_text("")
    grid = ["--grid", "learning-rate=1e-4,2e-4", "--grid", "lora-r=8,16"]

    dry = cli("sweep", *grid, "--set", "seed=7", "--max-cost", "1000", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert (
        "4 tasks, 2 at a time (what the GPU quota allows: "
        "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion in europe-west4: 2 GPUs)."
    ) in dry.output
    estimate = r"Estimated cost: ≈ \$\d+\.\d\d \(about \dh\d\dm x 4 tasks; from 1 finished run"
    assert re.search(estimate, dry.output)
    shared = re.search(r"Trainer arguments of every task: (.*)", dry.output)[1]
    assert "--seed 7 --sweep-grid 'learning-rate=1e-4,2e-4;lora-r=8,16'" in shared
    lines = [line for line in dry.output.splitlines() if line.startswith("│ task ")]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines]
    assert rows == [
        ["task 0", "1e-4", "8", "--learning-rate 1e-4 --lora-r 8"],
        ["task 1", "1e-4", "16", "--learning-rate 1e-4 --lora-r 16"],
        ["task 2", "2e-4", "8", "--learning-rate 2e-4 --lora-r 8"],
        ["task 3", "2e-4", "16", "--learning-rate 2e-4 --lora-r 16"],
    ]
    assert "Within --max-cost $1000.00." in dry.output
    assert "Dry run: nothing was started or changed." in dry.output
    one = cli("sweep", "--grid", "lora-r=8", "--dry-run")
    assert one.exit_code == 0, one.output
    assert one.output.startswith("1 task, 1 at a time (what the GPU quota allows: "), one.output
    assert "Then each task's own, parsed after them (its values win):\n" in one.output

    as_json = cli("sweep", *grid, "--set", "seed=7", "--dry-run", "--json")
    assert as_json.exit_code == 0, as_json.output
    plan = json.loads(as_json.stdout)
    assert set(plan) == {"dry_run", "execution_args", "tasks", "parallelism", "estimate", "max_cost", "notes"}
    assert plan["parallelism"] == {"tasks": 2, "why": re.search(r"at a time \((.*)\)\.", dry.output)[1]}
    assert plan["estimate"]["tasks"] == 4 and plan["estimate"]["cost_usd"] > 0 and plan["max_cost"] is None
    shared_args = plan["execution_args"]
    assert shlex.join(shared_args) == shared
    # Each task's arguments are what the trainer's parser reads in that task.
    for index, task in enumerate(plan["tasks"]):
        assert task["task"] == index
        environ = {TASK_INDEX: str(index)}
        parsed, picked = trainer_sweep.for_task(parse_args(shared_args), shared_args, environ)
        assert (parse_args(task["args"]), picked) == (parsed, index)
        assert (parsed.learning_rate, parsed.lora_r, parsed.seed) == (
            float(task["settings"]["learning-rate"]),
            int(task["settings"]["lora-r"]),
            7,
        )

    # `--train-size N` is `--set train-size=N`, as for `run`.
    sized = cli("sweep", *grid, "--train-size", "500", "--dry-run", "--json")
    assert sized.exit_code == 0, sized.output
    assert (
        json.loads(sized.stdout)["execution_args"]
        == json.loads(cli("sweep", *grid, "--set", "train-size=500", "--dry-run", "--json").stdout)[
            "execution_args"
        ]
    )
    assert "--train-size 500" in shlex.join(json.loads(sized.stdout)["execution_args"])

    # Above --max-cost: the plan, then the sweep's own refusal.
    over = cli("sweep", *grid, "--max-cost", "0", "--dry-run")
    assert over.exit_code == 2 and "│ task 3" in over.output
    assert "is above --max-cost $0.00: nothing was started." in over.output
    refused = cli("sweep", *grid, "--max-cost", "0")
    assert refused.exit_code == 2 and errors(over.output) == errors(refused.output) != []
    over_json = cli("sweep", *grid, "--max-cost", "0", "--dry-run", "--json")
    assert over_json.exit_code == 2 and errors(over_json.stderr) == errors(refused.output)
    assert json.loads(over_json.stdout)["max_cost"] == {"cost_usd": 0.0, "within": False}

    # Nothing started, nothing changed: no call that may change something, in Cloud Run or the bucket.
    assert [entry["method"] for entry in env.record() if entry["mutating"]] == []
    assert [found.name for found in clients.executions.list_executions(parent=JOB)] == before
    assert clients.jobs.get_job(name=JOB).generation == generation


# A trainer whose task 1 stops on an error a retry cannot fix, recording it as trainer/failure.py does,
# in its own task directory; task 0 succeeds.
TASK_1_FAILS = textwrap.dedent(
    """
    import json, os, pathlib, sys

    args = sys.argv[1:]
    flags = dict(zip(args[::2], args[1::2]))
    task = os.environ["CLOUD_RUN_TASK_INDEX"]
    run_dir = pathlib.Path(flags["--output-dir"]) / os.environ["CLOUD_RUN_EXECUTION"] / f"task-{task}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if task == "1":
        failure = {"error": "cannot read image Abyssinian_1.jpg", "hint": "Replace that image.", "attempt": 0}
        (run_dir / "failure.json").write_text(json.dumps(failure))
        sys.exit(2)
    results = {
        "baseline": {"accuracy": 0.05, "macro_f1": 0.02, "unknown_rate": 0.0},
        "final": {"accuracy": 0.5, "macro_f1": 0.4, "unknown_rate": 0.0},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    """
)


def test_a_task_that_stopped_on_an_unfixable_error_is_reported_and_ranked_last(env, tmp_path):
    project = fake_project(tmp_path / "fake-project")
    (project / "fake_trainer.py").write_text(TASK_1_FAILS)
    assert cli("up", "--skip-stage", "--source", str(project), "--max-retries", "0").exit_code == 0

    sweep = cli("sweep", "--grid", "lora-r=8,16", "--follow")
    assert sweep.exit_code == 2, sweep.output
    name = re.search(r"Started execution (\S+)", sweep.output)[1]
    assert (
        f"Error: Execution {name} stopped on an error a retry cannot fix: (task 1) cannot read image "
        "Abyssinian_1.jpg"
    ) in sweep.output
    assert "Hint: Replace that image." in sweep.output
    # Following one task ends with that task's outcome, whatever the execution's.
    unfixable = cli("logs", name, "--task", "1", "--follow")
    assert unfixable.exit_code == 2, unfixable.output
    assert (
        f"Error: Task 1 of execution {name} stopped on an error a retry cannot fix: cannot read image "
        "Abyssinian_1.jpg"
    ) in unfixable.output
    succeeded = cli("logs", name, "--task", "0", "--follow")
    assert succeeded.exit_code == 0, succeeded.output
    assert succeeded.output.endswith(f"Task 0 of execution {name} succeeded.\n")

    board = cli("results", name)
    assert board.exit_code == 0, board.output
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in board.output.splitlines()
        if line.startswith("│ task ")
    ]
    # label, lora-r, state, accuracy, macro-F1 (duration aside), then cost: a failed task cost too
    assert [row[:5] for row in rows] == [
        ["task 0", "8", "Succeeded", "5.0% -> 50.0%", "2.0% -> 40.0%"],
        ["task 1", "16", "Failed", "-", "-"],
    ]
    assert all(re.fullmatch(r"\$\d+\.\d\d", row[6]) for row in rows), rows
    # Its JSON names the cost as `status --json` and a run's `results --json` do.
    documents = json.loads(cli("results", name, "--json").stdout)
    assert [(row["task"], row["cost_usd"] > 0) for row in documents] == [(0, True), (1, True)]
    assert all("cost" not in row for row in documents)

    # Another bucket than the sweep's holds none of its tasks' results: an error, not a row of dashes each.
    for command in ("results", "report"):
        elsewhere = cli(command, name, "--bucket", "another-bucket")
        assert elsewhere.exit_code == 2, elsewhere.output
        assert elsewhere.output.startswith(
            f"Error: Execution {name} wrote its outputs to gs://{BUCKET}/, not to bucket another-bucket.\n"
        )

    # The report of a sweep is its tasks' pages, each read from its own task directory: the one that
    # wrote results, named by its combination.
    report = cli("report", name, "--out", str(tmp_path / "pages"))
    assert report.exit_code == 0, report.output
    page = (tmp_path / "pages" / f"report-{name}.html").read_text()
    assert f"{name} task 0 (lora-r=8)" in page and f"{name} task 1" not in page


# A trainer whose task 1 runs on for a minute after task 0 has ended; task 0 fails with --set seed=102.
TASK_1_RUNS_ON = textwrap.dedent(
    """
    import os, sys, time

    args = sys.argv[1:]
    flags = dict(zip(*[iter(arg for arg in args if arg != "--merge")] * 2))
    task = os.environ["CLOUD_RUN_TASK_INDEX"]
    print(f"task {task} starts", flush=True)
    if task == "1":
        time.sleep(60)
    if flags.get("--seed") == "102":
        print("failing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    print(f"task {task} done", flush=True)
    """
)


def test_following_one_task_ends_with_that_task_while_the_others_run_on(env, tmp_path):
    project = fake_project(tmp_path / "fake-project")
    (project / "fake_trainer.py").write_text(TASK_1_RUNS_ON)
    assert cli("up", "--skip-stage", "--source", str(project), "--max-retries", "0").exit_code == 0
    tasks = env.clients(PROJECT).tasks

    sweep = cli("sweep", "--grid", "lora-r=8,16")
    assert sweep.exit_code == 0, sweep.output
    name = re.search(r"Started execution (\S+)", sweep.output)[1]
    followed = cli("logs", name, "--task", "0", "--follow")
    assert followed.exit_code == 0, followed.output
    *lines, ended, goes_on = followed.output.splitlines()
    assert lines and all("[task 0] " in line for line in lines), followed.output
    assert any(line.endswith("[task 0] task 0 done") for line in lines), followed.output
    assert ended == f"Task 0 of execution {name} succeeded."
    assert goes_on == (
        f"Execution {name} goes on (1/2 tasks ended). Follow it with: gemma-launch logs {name} --follow"
    )
    first, second = tasks.list_tasks(parent=f"{JOB}/executions/{name}")
    assert first.completion_time and second.start_time and not second.completion_time
    as_json = cli("logs", name, "--task", "0", "--follow", "--json")
    assert as_json.exit_code == 0, as_json.output
    documents = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {document["task"] for document in documents} == {0}
    assert "task 0 done" in [document["text"] for document in documents]
    nothing = cli("report", name)  # this trainer writes no results.json
    assert nothing.exit_code == 2, nothing.output
    assert nothing.output.startswith(f"Error: Sweep {name} has no task with results yet (running).\n")
    assert f"Hint: `gemma-launch results {name}` shows each task's state" in nothing.output
    assert cli("cancel", name).exit_code == 0

    sweep = cli("sweep", "--grid", "lora-r=8,16", "--set", "seed=102")
    assert sweep.exit_code == 0, sweep.output
    name = re.search(r"Started execution (\S+)", sweep.output)[1]
    failed = cli("logs", name, "--task", "0", "--follow")
    assert failed.exit_code == 1, failed.output
    assert (
        f"Task 0 of execution {name} failed: The container exited with an error (exit code 3).\n"
        f"Execution {name} goes on (1/2 tasks ended)."
    ) in failed.output
    assert "[task 1]" not in failed.output and "[task 0] failing on purpose" in failed.output
    assert cli("logs", name, "--task", "0", "--follow", "--json").exit_code == 1
    assert cli("cancel", name).exit_code == 0


@pytest.mark.slow
def test_results_compares_executions_by_the_settings_that_differ(env, tmp_path):
    project = fake_project(tmp_path / "fake-project")
    assert cli("up", "--skip-stage", "--source", str(project)).exit_code == 0
    names = []
    for rate in ("0.125", "0.25"):
        run = cli("run", "--set", f"learning-rate={rate}", "--set", "lora-r=8", "--follow")
        assert run.exit_code == 0, run.output
        names.append(re.search(r"Started execution (\S+)", run.output)[1])

    table = cli("results", *names)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    header = next(line for line in lines if "learning-rate" in line)
    assert "lora-r" not in header  # the same in both: not a difference
    first, second = (next(line for line in lines if line.startswith(f"│ {name}")) for name in names)
    assert "0.125" in first and "5.0% -> 80.0%" in first and "2.0% -> 87.5%" in first
    assert "0.25" in second and "2.0% -> 100.0%" in second
    as_json = json.loads(cli("results", *names, "--json").output)
    assert [row["label"] for row in as_json] == [row["execution"] for row in as_json] == names
    # The same execution's cost under the same key in `status --json`.
    spent = {row["execution"]: row["cost_usd"] for row in json.loads(cli("status", "--json").output)}
    assert [row["cost_usd"] for row in as_json] == [spent[name] for name in names]
    assert [row["settings"] for row in as_json] == [{"learning-rate": "0.125"}, {"learning-rate": "0.25"}]
    assert as_json[1]["final"]["macro_f1"] == pytest.approx(1.0)
    assert all(row["cost_usd"] > 0 and row["duration_s"] > 0 for row in as_json)

    unknown = cli("results", names[0], "nope")
    assert (
        unknown.exit_code == 2
        and "Error: Execution nope of job gemma3-finetuning-job does not exist, and gs://" in (unknown.output)
    )


# The smallest real training the other emulated flows use: 74 images, batch 8; three epochs (30 steps)
# are the fewest in which the grid's combinations end apart. A checkpoint every 3 steps gives a killed
# task one to resume from.
TRAINER = {
    "train-size": 74,
    "eval-size": 37,
    "num-epochs": 3,
    "batch-size": 8,
    "eval-batch-size": 37,
    "save-steps": 3,
    "logging-steps": 1,
    "seed": 0,
    "eval-method": "score",
}


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_two_by_two_sweep_of_the_tiny_model_ranks_its_four_tasks(env, tmp_path, tiny_model, few_pets):
    # One thread per task: two tiny trainers side by side on two cores run faster without OpenMP's
    # threads spinning against each other.
    project = image_source(
        tmp_path / "project", ["python", "-m", "trainer"], with_trainer=True, env={"OMP_NUM_THREADS": "1"}
    )
    Path("gemma-launch.toml").write_text(
        f'project_id = "{PROJECT}"\n\n[trainer]\n'
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in TRAINER.items())
    )
    up_args = ["up", "--source", str(project), "--model-source", str(tiny_model)]
    up_args += ["--dataset-source", str(few_pets), "--max-retries", "1"]
    up = cli(*up_args)
    assert up.exit_code == 0, up.output

    sweep = cli("sweep", "--grid", "learning-rate=2e-2,5e-2", "--grid", "lora-r=4,16")
    assert sweep.exit_code == 0, sweep.output
    assert "4 tasks, 2 at a time (what the GPU quota allows: " in sweep.output
    execution = re.search(r"Started execution (\S+)", sweep.output)[1]
    # Task 1 is killed after its first checkpoint, as GPU host maintenance would: its retry resumes from
    # its own checkpoints, under its own directory.
    run_dir = env.emulator.bucket_dir(BUCKET) / "runs" / execution
    wait_for(lambda: any((run_dir / "task-1").glob("checkpoint-*/trainer_state.json")), "task 1's checkpoint")
    assert env.emulator.services["run"].kill_task(execution, 1)
    followed = cli("logs", execution, "--follow")
    assert followed.exit_code == 0, followed.output
    assert "4/4 tasks succeeded, 1 retried." in followed.output

    one_task = cli("logs", execution, "--task", "1")
    assert one_task.exit_code == 0, one_task.output
    task_lines = [line for line in one_task.output.splitlines() if line.strip()]
    assert task_lines and all("[task 1]" in line for line in task_lines)
    assert re.search(
        rf"task attempt 1: resuming from \S*/runs/{execution}/task-1/checkpoint-\d+", one_task.output
    )
    assert "sweep task 1: {'learning-rate': '2e-2', 'lora-r': '16'}" in one_task.output

    board = json.loads(cli("results", execution, "--json").output)
    assert sorted(row["task"] for row in board) == [0, 1, 2, 3]
    assert {row["execution"] for row in board} == {execution}
    assert all(row["state"] == "Succeeded" and row["duration_s"] > 0 and row["cost_usd"] > 0 for row in board)
    # Each task's cost is its own run time at the job's one price per second.
    assert len({round(row["cost_usd"] / row["duration_s"], 9) for row in board}) == 1
    ranks = [(row["final"]["accuracy"], row["final"]["macro_f1"]) for row in board]
    assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1], ranks
    for row in board:
        # Each task trained its own combination: the trainer recorded the flags it ran with.
        recorded = json.loads((run_dir / f"task-{row['task']}" / "results.json").read_text())
        flags = recorded["settings"]["flags"]
        assert (flags["learning-rate"], flags["lora-r"]) == (
            float(row["settings"]["learning-rate"]),
            int(row["settings"]["lora-r"]),
        )
    table = cli("results", execution)
    assert table.exit_code == 0, table.output
    assert f"Sweep {execution}" in table.output
    rows = [line for line in table.output.splitlines() if line.startswith("│ task ")]
    assert [line.split()[1:3] for line in rows] == [["task", str(row["task"])] for row in board]
    # The job kept its own parallelism: a second `up` changes nothing.
    again = cli(*up_args)
    assert "Everything was already in place" in again.output, again.output
