"""`gemma-launch up`, provisioning part: real clients, the emulator, the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from google.cloud import storage
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.oauth2.credentials import Credentials

from launcher.cli import main
from tests.support.record import changes

PROJECT = "demo-project"
TOKEN = "hf_test_token_0123456789abcdef"
SA = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
BUILD_SA = f"gemma3-finetuning-build@{PROJECT}.iam.gserviceaccount.com"
REPOSITORY = f"projects/{PROJECT}/locations/europe-west4/repositories/gemma3-finetuning-repo"
BUCKET = f"{PROJECT}-gemma3-finetuning"


@pytest.fixture
def env(fresh, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fresh


def up(*args: str):
    return CliRunner().invoke(main, ["up", "--skip-stage", "--skip-build", *args])


def test_fresh_up_creates_the_resources_with_least_privilege(env):
    result = up()
    assert result.exit_code == 0, result.output
    kinds = ("service account", "bucket", "bucket IAM", "repository", "repository IAM", "project IAM")
    for kind in (*kinds, "secret", "secret IAM"):
        assert any(line.split()[0] == "created" and kind in line for line in result.output.splitlines()), kind

    clients = env.clients(PROJECT)
    assert clients.iam.get_service_account(name=f"projects/{PROJECT}/serviceAccounts/{SA}").email == SA
    bucket = clients.storage.get_bucket(BUCKET)
    assert bucket.location.lower() == "europe-west4"
    assert bucket.iam_configuration.uniform_bucket_level_access_enabled
    bindings = {
        b["role"]: set(b["members"]) for b in bucket.get_iam_policy(requested_policy_version=3).bindings
    }
    assert bindings == {
        "roles/storage.objectUser": {f"serviceAccount:{SA}"},
        "roles/storage.objectViewer": {f"serviceAccount:{BUILD_SA}"},
    }
    repository = clients.registry.get_repository(name=REPOSITORY)
    assert repository.format_.name == "DOCKER"
    policy = clients.registry.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=REPOSITORY))
    assert [(b.role, list(b.members)) for b in policy.bindings] == [
        ("roles/artifactregistry.writer", [f"serviceAccount:{BUILD_SA}"])
    ]
    secret = f"projects/{PROJECT}/secrets/HF_TOKEN"
    assert (
        clients.secrets.access_secret_version(name=f"{secret}/versions/latest").payload.data == TOKEN.encode()
    )
    policy = clients.secrets.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=secret))
    assert [(b.role, list(b.members)) for b in policy.bindings] == [
        ("roles/secretmanager.secretAccessor", [f"serviceAccount:{SA}"])
    ]
    # The one project-wide grant is the build account's log writing, which has no narrower scope.
    project = clients.projects.get_iam_policy(
        request=iam_policy_pb2.GetIamPolicyRequest(resource=f"projects/{PROJECT}")
    )
    granted = {(b.role, member) for b in project.bindings for member in b.members}
    assert granted == {
        ("roles/owner", "user:developer@example.com"),
        ("roles/logging.logWriter", f"serviceAccount:{BUILD_SA}"),
    }


def test_second_up_changes_nothing_and_says_so(env):
    assert up().exit_code == 0
    before = len(env.record())
    again = up()
    assert again.exit_code == 0, again.output
    assert "Everything was already in place" in again.output
    assert "created" not in again.output and "updated" not in again.output
    second = env.record()[before:]
    assert second, "the second run must still check every resource"
    assert [entry for entry in second if entry["mutating"]] == []


def _bucket_roles(env, member: str) -> set[str]:
    policy = env.clients(PROJECT).storage.bucket(BUCKET).get_iam_policy(requested_policy_version=3)
    return {binding["role"] for binding in policy.bindings if member in binding["members"]}


def test_up_takes_the_job_out_of_the_wider_object_admin_role_earlier_versions_granted(env):
    member = f"serviceAccount:{SA}"
    assert up().exit_code == 0
    bucket = env.clients(PROJECT).storage.bucket(BUCKET)
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings = [b for b in policy.bindings if member not in b["members"]]
    policy.bindings.append({"role": "roles/storage.objectAdmin", "members": {member}})
    bucket.set_iam_policy(policy)

    again = up()
    assert again.exit_code == 0, again.output
    assert "roles/storage.objectUser on gs://" in again.output
    assert _bucket_roles(env, member) == {"roles/storage.objectUser"}
    assert "Everything was already in place" in up().output
    # down, after an up of an earlier version, removes the grant that version made.
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": "roles/storage.objectAdmin", "members": {member}})
    bucket.set_iam_policy(policy)
    down = CliRunner().invoke(main, ["down", "--yes"])
    assert down.exit_code == 0, down.output
    assert _bucket_roles(env, member) == set()


def test_first_up_waits_for_the_apis_it_enabled_and_says_so_when_google_takes_longer(env):
    """A just-enabled API answers SERVICE_DISABLED for a while: `up` retries that (the first up above
    passes through it), and past the retry deadline says to wait, not to enable what it enabled."""
    env.emulator.access.api_propagation_s = 600
    done = subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", "up", "--skip-build", "--skip-stage"],
        env={**os.environ, "GEMMA_LAUNCH_RETRY_DEADLINE": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert errors[0].startswith("Error: The ")
    assert "API, enabled moments ago, was still not served" in errors[0]
    assert errors[1] == "Hint: Wait a few minutes, then run the same command again: what is done stays done."
    assert "Traceback" not in done.stderr
    # Retried, with back-off: more than one call was refused as SERVICE_DISABLED, not a tight loop.
    refused = [e for e in env.record() if e["outcome"] == "PERMISSION_DENIED"]
    assert 2 <= len(refused) <= 20


def test_dry_run_on_a_fresh_project_lists_the_apis_to_enable_and_stops(env):
    result = up("--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["would", "enable"] and "run.googleapis.com" in line for line in lines)
    assert any(line.split()[0] == "unchanged" and "storage.googleapis.com" in line for line in lines)
    assert "gcloud services enable iam.googleapis.com" in result.output
    assert "The rest of the plan needs these APIs on" in result.output
    assert [entry for entry in env.record() if entry["mutating"]] == []


def test_first_up_enables_the_apis_and_a_second_enables_nothing(env):
    first = up()
    assert first.exit_code == 0, first.output
    enabled = [
        line.split()[-1] for line in first.output.splitlines() if line.split()[:2] == ["enabled", "API"]
    ]
    assert "run.googleapis.com" in enabled and "cloudbuild.googleapis.com" in enabled
    assert "storage.googleapis.com" not in enabled  # on in every new project
    second = up()
    assert second.exit_code == 0, second.output
    assert not any(line.split()[:1] == ["enabled"] for line in second.output.splitlines())
    assert not [entry for entry in env.record() if entry["method"] == "BatchEnableServices"][1:]


def test_dry_run_plans_with_gcloud_commands_and_changes_nothing(env):
    env.enable_apis()
    before = len(env.record())
    result = up("--dry-run")
    assert result.exit_code == 0, result.output
    assert "would create" in result.output
    assert "gcloud iam service-accounts create gemma3-finetuning" in result.output
    assert f"gcloud storage buckets create gs://{BUCKET}" in result.output
    assert "gcloud artifacts repositories create gemma3-finetuning-repo" in result.output
    assert [entry for entry in env.record()[before:] if entry["mutating"]] == []
    assert TOKEN not in result.output


def test_json_output(env):
    result = up("--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    statuses = {(change["kind"], change["status"]) for change in document["changes"]}
    assert ("secret", "created") in statuses and ("bucket", "created") in statuses


def test_changed_token_adds_exactly_one_version(env, monkeypatch):
    assert up().exit_code == 0
    monkeypatch.setenv("HF_TOKEN", TOKEN + "-rotated")
    result = up()
    assert result.exit_code == 0, result.output
    assert any("updated" in line and "secret " in line for line in result.output.splitlines())
    assert up().exit_code == 0  # the same rotated token again: no new version
    clients = env.clients(PROJECT)
    versions = list(clients.secrets.list_secret_versions(parent=f"projects/{PROJECT}/secrets/HF_TOKEN"))
    assert len(versions) == 2
    latest = clients.secrets.access_secret_version(
        name=f"projects/{PROJECT}/secrets/HF_TOKEN/versions/latest"
    )
    assert latest.payload.data == (TOKEN + "-rotated").encode()


def test_token_only_crosses_the_wire_in_add_secret_version(env):
    result = up()
    assert result.exit_code == 0
    carrying = [
        entry["method"]
        for entry in env.record()
        if TOKEN in json.dumps(entry) or _b64(TOKEN) in json.dumps(entry)
    ]
    assert carrying == ["AddSecretVersion"]
    assert TOKEN not in result.output


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()


def test_missing_token_on_first_up_is_a_clear_error(env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = up()
    assert result.exit_code == 2
    assert "Error: No Hugging Face token found." in result.output
    assert "Hint: export HF_TOKEN" in result.output
    assert "Traceback" not in result.output


def test_bad_settings_fail_before_any_request(env):
    result = up("--gpu", "nvidia-l4", "--memory", "4Gi")
    assert result.exit_code == 2
    assert "Error:" in result.output and "Hint:" in result.output
    assert env.record() == []


def test_bucket_in_another_region_is_refused_with_a_hint(env):
    clients = env.clients(PROJECT)
    bucket = clients.storage.bucket(BUCKET)
    clients.storage.create_bucket(bucket, location="us-central1")
    result = up()
    assert result.exit_code == 2
    assert "exists in US-CENTRAL1" in result.output
    assert "Hint:" in result.output


@pytest.mark.parametrize(
    ("repository", "said"),
    [
        ({"format_": "DOCKER", "docker_config": {"immutable_tags": True}}, "has immutable tags"),
        ({"format_": "PYTHON"}, "holds PYTHON packages, not Docker images"),
    ],
)
def test_a_repository_no_build_could_push_to_is_refused_before_building(env, local, repository, said):
    registry = env.clients(PROJECT).registry
    parent, _, repository_id = REPOSITORY.rpartition("/repositories/")
    registry.create_repository(
        request={"parent": parent, "repository_id": repository_id, "repository": repository}
    ).result(timeout=30)
    result = up()
    assert result.exit_code == 2, result.output
    assert said in result.output
    assert "Hint: Choose another repository with --repository" in result.output
    assert "Traceback" not in result.output


def without_billing(env) -> None:
    env.emulator.access.update_project(PROJECT, lambda record: record.update(billing_enabled=False))


def test_up_on_a_project_without_billing_stops_before_any_change(env):
    env.enable_apis()
    without_billing(env)
    env.record_path.write_text("")
    result = up()
    assert result.exit_code == 2
    assert "Error: Stopped before creating anything: billing: Billing is not enabled" in result.output
    assert "Hint: Link a billing account" in result.output
    assert "Traceback" not in result.output
    assert changes(env) == []


def test_up_on_a_new_project_without_billing_only_enables_the_apis_it_checks_billing_with(env):
    without_billing(env)
    result = up()
    assert result.exit_code == 2
    assert "Billing is not enabled" in result.output
    assert changes(env) == ["BatchEnableServices"]


def test_up_with_a_bucket_name_taken_by_another_project_changes_nothing(env):
    env.emulator.access.add_project("other-project", owner="user:someone@example.com")
    token = env.emulator.access.issue_token("user:someone@example.com")
    theirs = storage.Client(project="other-project", credentials=Credentials(token))
    theirs.create_bucket(theirs.bucket(BUCKET), location="europe-west4")
    env.record_path.write_text("")
    result = up()
    assert result.exit_code == 2
    assert f"Bucket name {BUCKET} is taken" in result.output
    assert "Hint: Bucket names are global: choose another with --bucket" in result.output
    assert changes(env) == []


def test_up_without_the_permissions_it_uses_changes_nothing(env):
    env.enable_apis()
    projects = env.clients(PROJECT).projects
    resource = f"projects/{PROJECT}"
    policy = projects.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=resource))
    updated = policy_pb2.Policy(etag=policy.etag)
    updated.bindings.add(role="roles/owner", members=["user:someone@example.com"])
    updated.bindings.add(role="roles/editor", members=["user:developer@example.com"])
    projects.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=updated))
    env.emulator.access.grants_propagated()  # as minutes later
    env.record_path.write_text("")
    result = up()
    assert result.exit_code == 2
    assert "permissions: Missing" in result.output and "storage.buckets.setIamPolicy" in result.output
    assert changes(env) == []
