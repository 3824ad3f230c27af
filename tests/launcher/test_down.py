"""`gemma-launch down`: real clients, the emulator, the CLI as a user runs it.

The job comes from `up` building a small image that runs a stand-in trainer (as tests/launcher/
test_run.py does), so the repository holds an image and the job executions can run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.api_core import exceptions
from google.iam.v1 import iam_policy_pb2

from launcher.cli import main
from tests.support.image_source import image_source

PROJECT = "demo-project"
TOKEN = "hf_down_test_token_0123456789abcdef"
SA = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
BUILD_SA = f"gemma3-finetuning-build@{PROJECT}.iam.gserviceaccount.com"
REPOSITORY = f"projects/{PROJECT}/locations/europe-west4/repositories/gemma3-finetuning-repo"
JOB = f"projects/{PROJECT}/locations/europe-west4/jobs/gemma3-finetuning-job"
SECRET = f"projects/{PROJECT}/secrets/HF_TOKEN"
BUCKET = f"{PROJECT}-gemma3-finetuning"

# Sleeps when asked (--seed 103, a trainer flag `run --set` accepts), else writes results and ends.
STAND_IN = textwrap.dedent(
    """
    import json, os, pathlib, sys, time

    flags = dict(zip(*[iter(arg for arg in sys.argv[1:] if arg != "--merge")] * 2))
    if flags.get("--seed") == "103":
        time.sleep(120)
    out = pathlib.Path(flags["--output-dir"]) / os.environ["CLOUD_RUN_EXECUTION"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"final": {"accuracy": 0.8}}))
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


def cli(*args: str, input: str | None = None):
    return CliRunner().invoke(main, list(args), input=input)


def up(project_dir: Path):
    result = cli("up", "--skip-stage", "--source", str(project_dir), "--max-retries", "0")
    assert result.exit_code == 0, result.output
    return result


def statuses(output: str) -> dict[str, list[str]]:
    """status -> the kinds that had it, from down's lines: status right-aligned in 12 columns, two
    spaces, the kind in 16, the name."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        status, kind = line[:12].strip(), line[14:30].strip()
        if status in ("would delete", "deleted", "absent", "kept", "cancelled") and kind:
            found.setdefault(status, []).append(kind)
    return found


def holds_nothing_up_made(clients) -> None:
    for read in (
        lambda: clients.jobs.get_job(name=JOB),
        lambda: clients.jobs.get_job(name=JOB + "-stage"),
        lambda: clients.registry.get_repository(name=REPOSITORY),
        lambda: clients.secrets.get_secret(name=SECRET),
        lambda: clients.iam.get_service_account(name=f"projects/{PROJECT}/serviceAccounts/{SA}"),
        lambda: clients.iam.get_service_account(name=f"projects/{PROJECT}/serviceAccounts/{BUILD_SA}"),
    ):
        with pytest.raises(exceptions.NotFound):
            read()
    bucket_members = {
        member
        for binding in clients.storage.bucket(BUCKET).get_iam_policy(requested_policy_version=3).bindings
        for member in binding["members"]
    }
    assert f"serviceAccount:{SA}" not in bucket_members
    assert f"serviceAccount:{BUILD_SA}" not in bucket_members
    project = clients.projects.get_iam_policy(
        request=iam_policy_pb2.GetIamPolicyRequest(resource=f"projects/{PROJECT}")
    )
    assert {(b.role, m) for b in project.bindings for m in b.members} == {
        ("roles/owner", "user:developer@example.com")
    }


@pytest.mark.slow
def test_down_removes_what_up_made_keeps_the_bucket_and_a_second_down_deletes_nothing(env, project_dir):
    up(project_dir)
    assert cli("run", "--follow").exit_code == 0  # an execution, and results in the bucket
    before = len(env.record())
    plan = cli("down", "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "would delete" in plan.output
    assert "gcloud artifacts repositories delete gemma3-finetuning-repo" in plan.output
    assert "gcloud projects remove-iam-policy-binding demo-project" in plan.output
    assert [entry for entry in env.record()[before:] if entry["mutating"]] == []

    first = cli("down")
    assert first.exit_code == 0, first.output
    done = statuses(first.output)
    assert sorted(done["deleted"]) == sorted(
        [
            "job",
            "bucket IAM",
            "bucket IAM",
            "repository IAM",
            "project IAM",
            "secret IAM",
            "repository",
            "secret",
            "service account",
            "service account",
        ]
    )
    assert done["absent"] == ["staging job"]  # --skip-stage: up never made it
    assert done["kept"] == ["bucket"]
    # What stays, and how it goes too, in the last line.
    assert first.output.splitlines()[-1] == (
        f"Deleted 10 resources. gs://{BUCKET} stays with the weights, data and results, which `status`, "
        "`results`, `report` and `logs` still read; `gemma-launch down --delete-bucket` deletes it too, "
        "`gemma-launch up` makes the rest again."
    )
    clients = env.clients(PROJECT)
    holds_nothing_up_made(clients)
    assert list(clients.storage.list_blobs(BUCKET, prefix="runs/"))  # the results stay

    before = len(env.record())
    second = cli("down")
    assert second.exit_code == 0, second.output
    assert "deleted" not in second.output
    assert "Nothing left to delete." in second.output
    assert [entry for entry in env.record()[before:] if entry["mutating"]] == []


def test_delete_bucket_with_no_name_to_read_deletes_nothing_and_says_to_pass_yes(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    closed = cli(
        "down", "--delete-bucket", input=""
    )  # stdin at its end, as in a script: asked before any call
    assert closed.exit_code == 2, closed.output
    assert f"Error: No bucket name was typed: nothing was deleted, gs://{BUCKET} included." in closed.output
    assert "Hint: Type its name when asked, or pass --yes" in closed.output
    assert "Aborted!" not in closed.output


def test_delete_bucket_asks_for_its_name(env):
    provisioned = cli("up", "--skip-stage", "--skip-build")  # no image: no job, only what provisioning makes
    assert provisioned.exit_code == 0, provisioned.output
    clients = env.clients(PROJECT)
    clients.storage.bucket(BUCKET).blob("runs/x/results.json").upload_from_string("{}")
    wrong = cli("down", "--delete-bucket", input="not-the-bucket\n")
    assert wrong.exit_code == 2
    assert "does not match" in wrong.output and "Hint:" in wrong.output
    assert clients.secrets.get_secret(name=SECRET)  # nothing was deleted

    typed = cli("down", "--delete-bucket", input=f"{BUCKET}\n")
    assert typed.exit_code == 0, typed.output
    # Named gs://B whether deleted, absent or kept, in text and in --json.
    assert f"     deleted  bucket           gs://{BUCKET}" in typed.output.splitlines()
    assert clients.storage.lookup_bucket(BUCKET) is None
    again = cli("down", "--delete-bucket", "--yes", "--json")
    assert again.exit_code == 0, again.output
    changes = json.loads(again.output)["changes"]
    assert {change["status"] for change in changes} == {"absent"}
    assert [change["name"] for change in changes if change["kind"] == "bucket"] == [f"gs://{BUCKET}"]
    # Without --delete-bucket, a bucket that is gone is absent too, not kept.
    plain = cli("down")
    assert plain.exit_code == 0, plain.output
    assert f"      absent  bucket           gs://{BUCKET}" in plain.output.splitlines()
    assert "kept" not in plain.output and "Nothing left to delete." in plain.output
    as_json = cli("down", "--json")
    assert as_json.exit_code == 0, as_json.output
    (bucket,) = [change for change in json.loads(as_json.output)["changes"] if change["kind"] == "bucket"]
    assert (bucket["name"], bucket["status"]) == (f"gs://{BUCKET}", "absent")


@pytest.mark.slow
def test_down_refuses_while_an_execution_runs_and_force_cancels_it(env, project_dir):
    up(project_dir)
    started = cli("run", "--set", "seed=103")
    assert started.exit_code == 0, started.output
    refused = cli("down")
    assert refused.exit_code == 2
    assert "still running" in refused.output and "--force" in refused.output
    assert env.clients(PROJECT).jobs.get_job(name=JOB)
    with pytest.raises(exceptions.FailedPrecondition):  # as Cloud Run refuses it, in the emulator's reading
        env.clients(PROJECT).jobs.delete_job(name=JOB)

    forced = cli("down", "--force")
    assert forced.exit_code == 0, forced.output
    assert statuses(forced.output)["cancelled"] == ["execution"]
    holds_nothing_up_made(env.clients(PROJECT))


@pytest.mark.slow
def test_up_after_down_rebuilds_everything(env, project_dir):
    up(project_dir)
    assert cli("down").exit_code == 0
    again = up(project_dir)
    created = {line.split()[1] for line in again.output.splitlines() if line.split()[:1] == ["created"]}
    assert {"service", "repository", "secret", "job"} <= created
    assert cli("run", "--follow").exit_code == 0


def test_up_grants_again_to_accounts_deleted_by_hand_and_down_leaves_their_deleted_members(env, project_dir):
    # A deleted account's grants stay as deleted:serviceAccount:EMAIL?uid=ID and are not inherited by a
    # new account of the same email (https://cloud.google.com/iam/docs/service-accounts-delete-undelete).
    up(project_dir)
    clients = env.clients(PROJECT)
    deleted = set()
    for email in (SA, BUILD_SA):
        name = f"projects/{PROJECT}/serviceAccounts/{email}"
        unique_id = clients.iam.get_service_account(name=name).unique_id
        clients.iam.delete_service_account(name=name)
        deleted.add(f"deleted:serviceAccount:{email}?uid={unique_id}")

    again = cli("up", "--skip-stage", "--source", str(project_dir), "--max-retries", "0", "--json")
    assert again.exit_code == 0, again.output
    created = [c["kind"] for c in json.loads(again.output)["changes"] if c["status"] == "created"]
    assert created.count("service account") == 2
    assert sorted(kind for kind in created if kind.endswith("IAM")) == sorted(
        ["bucket IAM", "bucket IAM", "repository IAM", "project IAM", "secret IAM"]
    )
    assert cli("run", "--follow").exit_code == 0  # the new job account reads the secret and the bucket

    done = cli("down")
    assert done.exit_code == 0, done.output
    assert statuses(done.output)["deleted"].count("bucket IAM") == 2
    with pytest.raises(exceptions.NotFound):
        clients.iam.get_service_account(name=f"projects/{PROJECT}/serviceAccounts/{SA}")
    # Grants to a deleted account are left for IAM to purge: they grant nothing, and removing them
    # would take its roles from the account should it be undeleted.
    bucket_members = {
        member
        for binding in clients.storage.bucket(BUCKET).get_iam_policy(requested_policy_version=3).bindings
        for member in binding["members"]
    }
    assert bucket_members & {f"serviceAccount:{SA}", f"serviceAccount:{BUILD_SA}"} == set()
    assert bucket_members >= deleted
    project = clients.projects.get_iam_policy(
        request=iam_policy_pb2.GetIamPolicyRequest(resource=f"projects/{PROJECT}")
    )
    log_writers = [list(b.members) for b in project.bindings if b.role == "roles/logging.logWriter"]
    assert log_writers == [[member for member in deleted if BUILD_SA in member]]


def test_down_in_a_fresh_project_with_its_apis_off_exits_0_enables_nothing_and_says_what_it_could_not_see(
    fresh, monkeypatch
):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    services = list(fresh.emulator.access.project(PROJECT)["services"])
    result = cli("down")
    assert result.exit_code == 0, result.output
    lines = {line.split()[-1]: line for line in result.output.splitlines() if line.startswith(" ")}
    assert lines[JOB].split()[:2] == ["not", "checked"]
    assert "run.googleapis.com is not enabled: cannot tell whether it exists" in result.output
    assert (
        lines[SA].split()[:2] == ["not", "checked"] and "iam.googleapis.com is not enabled" in result.output
    )
    assert "Error:" not in result.output and "gemma-launch up`, which enables" not in result.output
    assert "Nothing left to delete that down could see." in result.output
    assert (
        "Hint: If `gemma-launch up` never ran in this project, there is nothing to delete." in result.output
    )
    assert "gcloud services enable run.googleapis.com" in result.output
    as_json = json.loads(cli("down", "--json").output)
    assert "run.googleapis.com" in as_json["apis_not_enabled"]
    # Nothing to keep either: the bucket `up` would make is not there.
    assert {change["status"] for change in as_json["changes"]} == {"not checked", "absent"}
    assert fresh.emulator.access.project(PROJECT)["services"] == services  # down enabled nothing
    # With Cloud Storage off too, down cannot tell whether the bucket is there: neither kept nor absent.
    storage = fresh.clients(PROJECT).storage
    storage.create_bucket(storage.bucket(BUCKET), location="europe-west4")
    fresh.emulator.access.update_project(
        PROJECT, lambda record: record["services"].remove("storage.googleapis.com")
    )
    unseen = json.loads(cli("down", "--json").output)
    (bucket,) = [change for change in unseen["changes"] if change["kind"] == "bucket"]
    assert bucket["status"] == "not checked" and "storage.googleapis.com" in unseen["apis_not_enabled"]
