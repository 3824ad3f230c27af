"""Staging in the cloud: `up` builds the repository's real image, the emulated Cloud Run runs
launcher.staging.worker from that image against the Hub stand-in, and the launcher follows it through
Logging. Assertions on the bucket, the request record, the job and execution resources, and the output."""

from __future__ import annotations

import base64
import json
import re

import pytest
from click.testing import CliRunner
from google.cloud import run_v2
from huggingface_hub import constants
from pydantic import SecretStr

from launcher import staging
from launcher.cli import main
from launcher.settings import Settings
from tests.support.emulator import grants_in_effect_once_refused
from tests.support.hub_standin import HubStandin

TOKEN = "hf_CloudStageToken0123456789abcdefXYZ"
UNGRANTED = "hf_NotGrantedToken0123456789abcdefXY"
PROJECT = "demo-project"
BUCKET = f"{PROJECT}-gemma3-finetuning"
MODEL = "acme/gemma-3-tiny-it"
DATASET = "acme/oxford-iiit-pet"
STAGE_JOB = f"projects/{PROJECT}/locations/europe-west4/jobs/gemma3-finetuning-job-stage"
MiB = 1 << 20

MODEL_FILES = {
    "config.json": b'{"model_type": "gemma3", "hidden_size": 64}',
    "tokenizer.json": bytes(range(256)) * 200,
    # Above transfer.SMALL_FILE, so it goes through a resumable session, as real shards do.
    "model.safetensors": bytes(reversed(range(256))) * (12 * MiB // 256) + b"tail",
}
DATASET_FILES = {
    "README.md": b"---\nlicense: cc-by-sa-4.0\n---\n",
    "data/train-00000-of-00001.parquet": b"PAR1" + bytes(range(200)) * 1000,
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with HubStandin(tokens={TOKEN, UNGRANTED}) as standin:
        # huggingface_hub reads HF_ENDPOINT at import: this process needs its constant patched, the
        # staging job gets HF_ENDPOINT from the launcher's environment.
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        standin.add_repo(MODEL, MODEL_FILES)
        standin.add_repo(DATASET, DATASET_FILES, repo_type="dataset")
        yield standin


@pytest.fixture
def env(local, hub, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return local


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def stage_runs(local) -> list[dict]:
    return [
        entry
        for entry in local.record()
        if entry["method"] == "RunJob" and entry["request"]["name"] == STAGE_JOB
    ]


def objects(local, bucket: str, prefix: str) -> dict[str, tuple]:
    """Each object under prefix (by relative path): size, crc32c and metadata, as Cloud Storage has them."""
    return {
        blob.name.removeprefix(prefix + "/"): (blob.size, blob.crc32c, blob.metadata)
        for blob in local.clients(PROJECT).storage.list_blobs(bucket, prefix=prefix + "/")
        if not blob.name.endswith(staging.MARKER)
    }


def marker(local, bucket: str, prefix: str) -> dict:
    document = staging.read_marker(local.clients(PROJECT).storage, bucket, prefix)
    assert document is not None, f"gs://{bucket}/{prefix}/ is not completely staged"
    document.pop("staged_at")
    return document


def files(local, prefix: str) -> dict[str, bytes]:
    root = local.emulator.bucket_dir(BUCKET) / prefix
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.name != staging.MARKER
    }


@pytest.mark.slow
def test_up_stages_hub_repos_in_the_cloud_like_local_staging_and_then_runs_nothing(env, hub, tmp_path):
    result = cli("up", "--model-source", MODEL, "--dataset-source", DATASET, "--verbose")

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    kinds = [line.split()[1] for line in lines if line.split()[:1] == ["created"]]
    # provision -> build -> stage -> job: the staging job runs the image this `up` built.
    assert kinds.index("image") < kinds.index("staging") < kinds.index("model") < kinds.index("job")
    # --verbose reaches the job: its log has a line per file.
    assert any(re.search(r"\[task 0\]\s+uploaded model.safetensors", line) for line in lines)
    assert files(env, MODEL) == MODEL_FILES
    assert files(env, "datasets/oxford-iiit-pet") == DATASET_FILES
    commit = hub.repos[("model", MODEL)].branches["main"]
    assert marker(env, BUCKET, MODEL)["revision"] == commit

    clients = env.clients(PROJECT)
    job = clients.jobs.get_job(name=STAGE_JOB)
    container = job.template.template.containers[0]
    image = clients.jobs.get_job(name=STAGE_JOB.removesuffix("-stage")).template.template.containers[0].image
    assert container.image == image and "@sha256:" in image
    assert list(container.command) == ["python", "-m", "launcher.staging.worker"]
    assert dict(container.resources.limits) == {"cpu": "4", "memory": "16Gi"}
    task = job.template.template
    assert (task.max_retries, task.timeout.total_seconds()) == (3, 2 * 3600)
    assert task.service_account == f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    assert not task.node_selector.accelerator and not task.volumes
    env_vars = {var.name: var for var in container.env}
    assert env_vars["HF_TOKEN"].value == "" and env_vars["HF_TOKEN"].value_source.secret_key_ref.secret
    assert env_vars["HF_ENDPOINT"].value == hub.endpoint

    # The same verified objects and marker as staging from this machine into another bucket.
    copy = f"{PROJECT}-local-copy"
    clients.storage.create_bucket(copy, location="europe-west4")
    settings = Settings(
        project_id=PROJECT, bucket=copy, model_id=MODEL, dataset_id=DATASET, hf_token=SecretStr(TOKEN)
    )
    local_staged = staging.stage(clients, settings, stage_in="local")
    assert [item.status for item in local_staged] == ["created", "created"]
    for prefix in (MODEL, "datasets/oxford-iiit-pet"):
        assert objects(env, BUCKET, prefix) == objects(env, copy, prefix)
        assert marker(env, BUCKET, prefix) == marker(env, copy, prefix)

    # The token went to Secret Manager and nowhere else: not the record, the task's argv, the output.
    carrying = [
        entry["method"]
        for entry in env.record()
        if TOKEN in json.dumps(entry) or base64.b64encode(TOKEN.encode()).decode() in json.dumps(entry)
    ]
    assert carrying == ["AddSecretVersion"]
    (execution,) = clients.executions.list_executions(parent=STAGE_JOB)
    spec = run_v2.Execution.to_json(execution) + run_v2.Job.to_json(job)
    assert TOKEN not in spec
    assert f"--revision\n{commit}" in "\n".join(execution.template.containers[0].args)
    assert TOKEN not in result.output
    assert TOKEN not in (env.emulator.data_dir / "logging.jsonl").read_text()

    # A second `up`: the markers say complete for the resolved revision, so no staging job runs.
    runs = len(stage_runs(env))
    again = cli("up", "--model-source", MODEL, "--dataset-source", DATASET)

    assert again.exit_code == 0, again.output
    assert "Everything was already in place" in again.output
    assert len(stage_runs(env)) == runs == 1
    assert re.search(r"unchanged\s+model\s+gs://", again.output)

    # A new commit on the Hub: the staging job (unchanged) runs again, for the model only.
    changed = {**MODEL_FILES, "config.json": b'{"model_type": "gemma3", "hidden_size": 32}'}
    hub.add_repo(MODEL, changed)
    third = cli("up", "--model-source", MODEL, "--dataset-source", DATASET)

    assert third.exit_code == 0, third.output
    assert re.search(r"unchanged\s+staging job", third.output)
    assert re.search(r"updated\s+model\s+gs://", third.output)
    assert re.search(r"unchanged\s+dataset\s+gs://", third.output)
    assert files(env, MODEL) == changed
    assert len(stage_runs(env)) == 2


@pytest.mark.slow
def test_a_failing_staging_job_ends_with_error_and_hint(env, hub, monkeypatch):
    # The secret holds a token whose account never accepted the licence; this machine's token did.
    monkeypatch.setenv("HF_TOKEN", UNGRANTED)
    assert cli("up", "--skip-stage").exit_code == 0
    hub.add_repo(MODEL, MODEL_FILES, gated=True, granted={TOKEN})
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    result = cli("stage", "--stage-in", "cloud", "--model-source", MODEL, "--dataset-source", DATASET)

    assert result.exit_code == 2, result.output
    execution = re.search(r"execution (gemma3-finetuning-job-stage-\w+)", result.output)[1]
    error = result.output[result.output.index("Error:") :]
    assert f"Staging execution {execution}" in error and "gated" in error
    assert f"gemma-launch logs {execution} --job gemma3-finetuning-job-stage" in error
    assert "secret HF_TOKEN" in error
    shown = cli("logs", execution, "--job", "gemma3-finetuning-job-stage")
    assert shown.exit_code == 0 and "is gated" in shown.output
    assert "Traceback" not in result.output
    assert staging.read_marker(env.clients(PROJECT).storage, BUCKET, MODEL) is None
    assert TOKEN not in result.output and UNGRANTED not in result.output


@pytest.mark.slow
def test_local_directories_stage_from_this_machine_and_cloud_refuses_them(env, hub, tmp_path):
    model_dir = tmp_path / "tiny-gemma"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(b"{}")
    (model_dir / "model.safetensors").write_bytes(b"\1" * 5000)
    assert cli("up", "--skip-stage").exit_code == 0

    refused = cli("stage", "--stage-in", "cloud", "--model-source", str(model_dir))
    assert refused.exit_code == 2
    assert "cannot read this machine's files" in refused.output and "Hint:" in refused.output

    result = cli("stage", "--model-source", str(model_dir), "--dataset-source", DATASET)

    assert result.exit_code == 0, result.output
    assert files(env, "models/tiny-gemma") == {"config.json": b"{}", "model.safetensors": b"\1" * 5000}
    # Without --verbose the job's log tells the quarters of the bytes (test_staging.py), not each file. How
    # many quarters show depends on how the download's progress updates fell (on a loaded machine the
    # 200 KB can arrive in one, which prints none: "Staged" says it is all there).
    assert re.search(r"\[task 0\] Staged 200\.0 KB in ", result.output), result.output
    assert "uploaded" not in result.output
    # The Hub dataset went through the staging job, the directory did not.
    (run,) = stage_runs(env)
    args = run["request"]["overrides"]["containerOverrides"][0]["args"]
    assert args[args.index("--kind") :].count("--kind") == 1 and "dataset" in args
    assert str(model_dir) not in json.dumps(run)


@pytest.mark.slow
def test_a_disabled_account_stops_staging_in_the_cloud_before_the_staging_job_changes(env, hub):
    assert cli("up", "--skip-stage").exit_code == 0
    account = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    iam = env.clients(PROJECT).iam
    iam.disable_service_account(request={"name": f"projects/{PROJECT}/serviceAccounts/{account}"})
    env.record_path.write_text("")
    for dry_run in ((), ("--dry-run",)):
        refused = cli(
            "stage", "--stage-in", "cloud", "--model-source", MODEL, "--dataset-source", DATASET, *dry_run
        )
        assert refused.exit_code == 2, refused.output
        assert (
            f"Error: Job gemma3-finetuning-job-stage runs as service account {account}, which is disabled"
            in (refused.output)
        )
        assert f"gcloud iam service-accounts enable {account}" in refused.output
    assert [e["method"] for e in env.record() if e["mutating"]] == []

    iam.enable_service_account(request={"name": f"projects/{PROJECT}/serviceAccounts/{account}"})
    staged = cli("stage", "--stage-in", "cloud", "--model-source", MODEL, "--dataset-source", DATASET)
    assert staged.exit_code == 0, staged.output
    assert len(stage_runs(env)) == 1


def test_without_an_image_auto_stages_locally_and_cloud_says_run_up(env, hub):
    env.clients(PROJECT).storage.create_bucket(BUCKET, location="europe-west4")

    result = cli("stage", "--model-source", MODEL, "--dataset-source", DATASET)
    assert result.exit_code == 0, result.output
    assert "No image of this project yet" in result.output
    assert files(env, MODEL) == MODEL_FILES
    assert stage_runs(env) == []

    refused = cli("stage", "--stage-in", "cloud")
    assert refused.exit_code == 2
    assert "gemma-launch up" in refused.output


def test_dry_run_shows_the_staging_job_and_changes_nothing(env, hub):
    result = cli("up", "--dry-run", "--model-source", MODEL, "--dataset-source", DATASET)

    assert result.exit_code == 0, result.output
    assert re.search(r"would create\s+staging job", result.output)
    assert "gcloud run jobs create gemma3-finetuning-job-stage" in result.output
    assert "gcloud run jobs execute gemma3-finetuning-job-stage" in result.output
    commands = result.output.split("Equivalent commands:")[1]
    assert "gcloud builds submit" in commands and "gcloud run jobs execute" in commands
    assert not [e for e in env.record() if e["method"].startswith(("Create", "Run", "Update", "Add"))]
    # Reads are allowed (the estimate looks for earlier runs' results in the bucket); writes are not.
    assert not [e for e in env.record() if e["service"] == "storage" and e["mutating"]]
    assert hub.downloads() == []


@pytest.mark.slow
def test_a_first_up_stages_in_the_cloud_though_the_role_it_granted_the_job_is_not_in_effect_at_once(env, hub):
    """Seconds after `up` grants the job's account roles/storage.objectUser, the staging job writes the
    bucket as that account: the attempt refused while Google puts the role in effect is retried by Cloud
    Run (the staging job's max_retries), and `up` goes on."""
    access = env.emulator.access
    with grants_in_effect_once_refused(access):
        result = cli("up", "--model-source", MODEL, "--dataset-source", DATASET)
    assert result.exit_code == 0, result.output
    assert "does not have storage.objects.list access" in result.output
    assert "failed on attempt 0; retrying (attempt 1 of at most 4)" in result.output
    job_account = f"serviceAccount:gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
    assert ("roles/storage.objectUser", job_account) in access.held_back
    assert len(stage_runs(env)) == 1
    assert files(env, MODEL) == MODEL_FILES
    assert files(env, "datasets/oxford-iiit-pet") == DATASET_FILES
