"""What a fresh Google Cloud project answers the CLI, through the real clients and the stricter emulator.

Each test is one of the ways a first `up` used to fail on real Google Cloud: APIs off, permissions
checked per caller (403 `Forbidden` from Cloud Storage, PERMISSION_DENIED from gRPC), a bucket name
taken by another project, no credentials at all. Every one must end in one Error line and one Hint
line that says what to do, exit status 2, and no traceback.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.api_core import exceptions
from google.cloud import storage
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.oauth2.credentials import Credentials

from launcher import down, iam_bindings, provision
from launcher import job as jobs
from launcher.cli import main
from launcher.emulator.server import Emulator
from launcher.settings_sources import load_settings

PROJECT = "demo-project"
BUCKET = f"{PROJECT}-gemma3-finetuning"
STRANGER = "user:someone@example.com"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(fresh, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_0123456789abcdef")
    return fresh


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def assert_explained(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error:")]
    hints = [line for line in lines if line.startswith("Hint:")]
    assert len(errors) == 1 and len(hints) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, (fragment, result.output)


@pytest.mark.parametrize("command", [["status"], ["logs"], ["results"], ["run"]])
def test_cloud_run_calls_on_a_project_without_the_run_api_say_how_to_enable_it(env, command):
    result = invoke(*command)
    assert_explained(
        result, "run.googleapis.com API is not enabled", "gemma-launch up", "gcloud services enable"
    )


def test_a_bucket_name_another_project_holds_is_reported_as_taken_and_nothing_is_created(env):
    env.emulator.access.add_project("someone-elses", owner=STRANGER)
    token = env.emulator.access.issue_token(STRANGER)
    theirs = storage.Client(project="someone-elses", credentials=Credentials(token))
    theirs.create_bucket(BUCKET, location="europe-west4")

    result = invoke("up", "--skip-build", "--skip-stage")
    assert_explained(result, "Stopped before creating anything", f"Bucket name {BUCKET} is taken", "--bucket")
    # Cloud Storage answered 403 (not 404) to the bucket lookup, which is how "taken" is told apart.
    lookups = [
        e
        for e in env.record()
        if e["method"] == "buckets.get" and e["request"]["params"]["bucket_name"] == BUCKET
    ]
    assert lookups and lookups[-1]["outcome"] == "FORBIDDEN"


def _make_viewer(env, role: str | None = "roles/viewer") -> None:
    """The CLI's account keeps only `role` (or nothing); someone else owns the project."""
    clients = env.clients(PROJECT)
    clients.service_usage.enable_service(
        request={"name": f"projects/{PROJECT}/services/cloudresourcemanager.googleapis.com"}
    ).result()
    time.sleep(env.emulator.access.api_propagation_s)  # until Resource Manager serves it
    projects = clients.projects
    resource = f"projects/{PROJECT}"
    policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role="roles/owner", members=[STRANGER])])
    if role:
        policy.bindings.add(role=role, members=["user:developer@example.com"])
    projects.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=policy))
    env.emulator.access.grants_propagated()  # as minutes later


def test_a_missing_permission_names_it_and_the_role_that_grants_it(env):
    env.enable_apis()
    _make_viewer(env, role=None)
    # status reads the job first: whether it exists decides where past runs are read from (after down).
    result = invoke("status")
    assert_explained(
        result,
        "Permission denied",
        "run.jobs.get",
        "roles/run.viewer",
        "gcloud projects add-iam-policy-binding demo-project --member=user:YOUR_EMAIL",
    )


def test_up_without_the_permissions_it_needs_stops_before_creating_anything(env):
    _make_viewer(env)
    env.record_path.write_text("")  # only what `up` sends from here
    result = invoke("up", "--skip-build", "--skip-stage")
    assert_explained(result, "Stopped before creating anything", "serviceusage.services.enable")
    assert not [e for e in env.record() if e["method"].startswith(("Create", "Set", "BatchEnable"))]


def test_a_cloud_storage_403_is_a_permission_error_with_the_storage_role(env, tmp_path, synthetic_pets):
    env.enable_apis()
    assert invoke("up", "--skip-build", "--skip-stage").exit_code == 0
    _make_viewer(env)
    model, data = tmp_path / "model", synthetic_pets(1, 1)
    model.mkdir()
    (model / "config.json").write_text("{}")
    result = invoke(
        "stage", "--stage-in", "local", "--model-source", str(model), "--dataset-source", str(data)
    )
    assert_explained(result, "Permission denied", "storage.objects.", "roles/storage.")


@pytest.mark.slow
def test_no_credentials_at_all_say_how_to_log_in(monkeypatch):
    # No emulator: the real clients look for Application Default Credentials, and find none (the test
    # environment points gcloud's config and the metadata server at nothing).
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    for command in (["up", "--dry-run"], ["status"], ["logs"], ["results"], ["run"]):
        result = invoke(*command)
        assert_explained(result, "No Google Cloud credentials found", "gcloud auth application-default login")


def test_the_jobs_bucket_mount_belongs_to_the_user_the_image_runs_as(monkeypatch):
    # The emulator refuses a writable mount a non-root image cannot write to (gcsfuse gives files to
    # the mounting user); the real Dockerfile's USER and the job's uid/gid mount options must agree.
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    user = re.search(r"^USER (\d+):(\d+)$", (REPO_ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert user, "the image runs as a numeric non-root user"
    spec = jobs.job_spec(load_settings(), "image", [])
    options = spec.template.template.volumes[0].gcs.mount_options
    assert f"uid={user[1]}" in options and f"gid={user[2]}" in options


def test_a_project_without_billing_is_told_to_link_a_billing_account(tmp_path, monkeypatch):
    with Emulator(data_dir=tmp_path / "cloud", billing=False) as emulator:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.storage_host)
        monkeypatch.setenv("PROJECT_ID", PROJECT)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_0123456789abcdef")
        result = invoke("up", "--skip-build", "--skip-stage")
    assert_explained(result, "Billing", "billing/linkedaccount?project=demo-project")


def test_a_stale_bucket_policy_etag_is_refused_and_provisioning_reads_again(local):
    # Cloud Storage answers a setIamPolicy carrying a stale etag with 412; provisioning treats that like
    # gRPC's ABORTED: another writer won the race, so read the policy again and re-apply.
    storage_client = local.clients(PROJECT).storage
    bucket = storage_client.create_bucket(BUCKET, location="europe-west4")
    stale = bucket.get_iam_policy()
    fresh_policy = bucket.get_iam_policy()
    fresh_policy.bindings.append({"role": "roles/storage.objectViewer", "members": {"allUsers"}})
    bucket.set_iam_policy(fresh_policy)
    with pytest.raises(exceptions.PreconditionFailed) as raced:
        bucket.set_iam_policy(stale)
    assert iam_bindings._POLICY_RACE_RETRY._predicate(raced.value)


EXPIRING = {"title": "until 2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}


def _add_conditional_viewer(projects) -> None:
    """What many projects carry: a grant with an IAM condition, which makes the policy version 3."""
    resource = f"projects/{PROJECT}"
    v3 = {"requested_policy_version": 3}
    policy = projects.get_iam_policy(request={"resource": resource, "options": v3})
    policy.version = 3
    policy.bindings.add(role="roles/viewer", members=[STRANGER], condition=EXPIRING)
    projects.set_iam_policy(request={"resource": resource, "policy": policy})


def test_a_policy_with_conditions_must_be_read_and_written_as_version_3(local):
    projects = local.clients(PROJECT).projects
    resource = f"projects/{PROJECT}"
    _add_conditional_viewer(projects)

    # Read as version 1 (no options), the conditional binding hides its condition behind a mangled role.
    v1 = projects.get_iam_policy(request={"resource": resource})
    assert v1.version == 1
    hidden = [b for b in v1.bindings if b.role.startswith("roles/viewer_withcond_")]
    assert len(hidden) == 1 and not hidden[0].HasField("condition")
    # Writing that back, even unchanged, would drop the condition: refused.
    with pytest.raises(exceptions.InvalidArgument, match="version 3"):
        projects.set_iam_policy(request={"resource": resource, "policy": v1})
    # So is a conditional binding in a policy that does not say version 3.
    v3 = projects.get_iam_policy(request={"resource": resource, "options": {"requested_policy_version": 3}})
    assert v3.version == 3
    v3.version = 1
    with pytest.raises(exceptions.InvalidArgument, match="version 3"):
        projects.set_iam_policy(request={"resource": resource, "policy": v3})


def test_up_and_down_keep_the_projects_conditional_bindings(local):
    # The build account's logWriter is granted on the project, whose policy often has conditions: the
    # read-modify-write must use version 3 or the real API refuses it.
    clients = local.clients(PROJECT)
    settings = load_settings(None, {"project_id": PROJECT})
    _add_conditional_viewer(clients.projects)
    provision.ensure_build_account(clients, settings)

    granted = iam_bindings.ensure_build_log_writer(clients, settings)
    assert granted.status == "created"
    assert iam_bindings.ensure_build_log_writer(clients, settings).status == "unchanged"
    member = f"serviceAccount:{settings.build_service_account_email}"
    v3 = {"requested_policy_version": 3}
    policy = clients.projects.get_iam_policy(request={"resource": f"projects/{PROJECT}", "options": v3})
    assert [b.condition.title for b in policy.bindings if b.role == "roles/viewer"] == [EXPIRING["title"]]
    assert any(b.role == iam_bindings.LOG_WRITER and member in b.members for b in policy.bindings)

    removed = [c for c in down.remove_bindings(clients, settings, dry_run=False) if c.kind == "project IAM"]
    assert [c.status for c in removed] == ["deleted"]
    policy = clients.projects.get_iam_policy(request={"resource": f"projects/{PROJECT}", "options": v3})
    assert [b.condition.title for b in policy.bindings if b.role == "roles/viewer"] == [EXPIRING["title"]]
    assert not any(member in b.members for b in policy.bindings)


def test_batch_get_services_reads_at_most_30_services_of_its_parent(local):
    # serviceusage.proto, BatchGetServicesRequest: "A single request can get a maximum of 30 services",
    # and each name's parent must match `parent`.
    service_usage = local.clients(PROJECT).service_usage
    parent = f"projects/{PROJECT}"
    names = [f"{parent}/services/api{i}.googleapis.com" for i in range(31)]
    with pytest.raises(exceptions.InvalidArgument, match="at most 30"):
        service_usage.batch_get_services(request={"parent": parent, "names": names})
    with pytest.raises(exceptions.InvalidArgument, match="not under the parent"):
        service_usage.batch_get_services(
            request={"parent": parent, "names": ["projects/another-project/services/run.googleapis.com"]}
        )
    number = local.emulator.access.project(PROJECT)["number"]
    found = service_usage.batch_get_services(
        request={"parent": parent, "names": [f"projects/{number}/services/run.googleapis.com"]}
    )
    assert [service.state.name for service in found.services] == ["ENABLED"]
