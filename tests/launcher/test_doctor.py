"""`gemma-launch doctor` through the CLI, the real clients and the emulator: each check passing, failing."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from google.api_core import exceptions
from google.cloud import storage
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.oauth2.credentials import Credentials

from launcher.cli import main
from launcher.doctor_checks import UP_PERMISSIONS
from tests.support.record import changes

PROJECT = "demo-project"
BUCKET = f"{PROJECT}-gemma3-finetuning"
OTHER = "other-project"
SOMEONE = "user:someone@example.com"
NAMES = [
    "credentials",
    "project",
    "billing",
    "apis",
    "permissions",
    "gpu_region",
    "gpu_quota",
    "build_location",
    "bucket",
    "service_accounts",
]


@pytest.fixture(autouse=True)
def project(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)


def doctor(*args: str):
    return CliRunner().invoke(main, ["doctor", *args])


def line(result, title: str) -> str:
    """The output line of the check titled `title`."""
    (found,) = [text for text in result.output.splitlines() if text[2:].startswith(title + " ")]
    return found


def checks(result) -> dict[str, dict]:
    return {check["name"]: check for check in json.loads(result.stdout)["checks"]}


def test_a_ready_project_passes_every_check_and_exits_0(local):
    result = doctor()
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == len(NAMES) and all(text.startswith("✓ ") for text in lines), result.output
    assert "developer@example.com" in line(result, "credentials")
    assert f"gs://{BUCKET} is free" in line(result, "bucket")
    assert f"all {len(UP_PERMISSIONS)}" in line(result, "permissions")
    # Each check's finding starts in one column, after the longest title ("service accounts").
    column = len("✓ service accounts ")
    assert all(text[column - 1] == " " and text[column] != " " for text in lines), result.output
    assert line(result, "bucket").startswith(f"✓ bucket{' ' * (column - len('✓ bucket'))}gs://")

    as_json = doctor("--json")
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)
    assert document["ok"] is True
    assert [check["name"] for check in document["checks"]] == NAMES
    assert {check["status"] for check in document["checks"]} == {"ok"}


def test_a_fresh_project_says_what_cannot_be_checked_until_up_enables_the_apis(fresh):
    result = doctor()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert line(result, "credentials").startswith("✓")
    billing = line(result, "billing")
    assert billing.startswith("✗") and "Cannot check until the cloudbilling.googleapis.com API" in billing
    assert "`gemma-launch up` enables it first" in billing
    assert "Cannot check until the cloudresourcemanager.googleapis.com API" in line(result, "permissions")
    apis = line(result, "APIs")
    assert apis.startswith("✗") and "gcloud services enable iam.googleapis.com" in apis
    assert line(result, "bucket").startswith("✓")
    assert "Error: 5 of 10 checks failed: project, billing, APIs, permissions, GPU quota." in result.output
    assert "Hint:" in result.output
    assert checks(doctor("--json"))["billing"]["status"] == "unchecked"
    assert "no quota needed" in line(doctor("--gpu", "none"), "GPU quota")  # whatever the Quotas API
    assert changes(fresh) == []


def test_billing_off_fails_with_the_console_link(local):
    local.emulator.access.update_project(PROJECT, lambda record: record.update(billing_enabled=False))
    result = doctor()
    assert result.exit_code == 2
    billing = line(result, "billing")
    assert billing.startswith("✗") and "Billing is not enabled for project demo-project" in billing
    assert "https://console.cloud.google.com/billing/linkedaccount?project=demo-project" in billing
    assert "Error: 1 of 10 checks failed: billing." in result.output
    as_json = doctor("--json")
    assert as_json.exit_code == 2
    assert json.loads(as_json.stdout)["ok"] is False
    assert checks(as_json)["billing"]["status"] == "failed"


def test_missing_permissions_are_listed_with_the_smallest_role_grantable_on_the_project(local):
    # An owner hands the project over and keeps roles/editor, which holds no *.setIamPolicy.
    projects = local.clients(PROJECT).projects
    resource = f"projects/{PROJECT}"
    policy = projects.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=resource))
    updated = policy_pb2.Policy(etag=policy.etag)
    updated.bindings.add(role="roles/owner", members=[SOMEONE])
    updated.bindings.add(role="roles/editor", members=["user:developer@example.com"])
    projects.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=updated))

    result = doctor()
    assert result.exit_code == 2
    permissions = line(result, "permissions")
    assert permissions.startswith("✗")
    for permission, role in [
        ("storage.buckets.setIamPolicy", "roles/storage.admin"),
        ("resourcemanager.projects.setIamPolicy", "roles/resourcemanager.projectIamAdmin"),
        ("secretmanager.secrets.setIamPolicy", "roles/secretmanager.admin"),
        ("secretmanager.versions.access", "roles/secretmanager.secretAccessor"),
    ]:
        assert f"{permission} ({role})" in permissions
    assert "storage.buckets.create" not in permissions  # editors may create buckets
    assert "legacy" not in permissions  # bucket-only roles cannot be granted on a project
    assert "--member=user:developer@example.com" in permissions
    assert "Error: 1 of 10 checks failed: permissions." in result.output


def test_a_gpu_not_offered_in_the_region_is_one_failing_check_among_the_others(local):
    result = doctor("--gpu", "nvidia-l4", "--region", "us-east4", "--memory", "16Gi")
    assert result.exit_code == 2
    region = line(result, "GPU region")
    assert region.startswith("✗") and "nvidia-l4 GPUs are not offered in us-east4" in region
    assert "Use --region with one of us-central1" in region
    assert line(result, "permissions").startswith("✓")
    assert doctor("--gpu", "none").exit_code == 0
    # Offered in the region, but refused by `up` before any request: the image cannot use its driver.
    l4 = doctor("--gpu", "nvidia-l4")
    assert l4.exit_code == 2, l4.output
    region = line(l4, "GPU region")
    assert region.startswith("✗ GPU region") and "The image cannot use Cloud Run's L4" in region, region
    assert "Use --gpu nvidia-rtx-pro-6000 (driver 580)" in region


def test_no_gpu_quota_fails_with_the_request_link_and_a_cpu_job_needs_none(local):
    local.emulator.services["quotas"].set_gpu_quota(0)
    result = doctor()
    assert result.exit_code == 2
    gpu_quota = line(result, "GPU quota")
    assert gpu_quota.startswith("✗") and "No Cloud Run GPU quota yet" in gpu_quota
    assert "https://console.cloud.google.com/iam-admin/quotas?project=demo-project" in gpu_quota
    cpu_only = doctor("--gpu", "none")
    assert cpu_only.exit_code == 0, cpu_only.output
    assert "no quota needed" in line(cpu_only, "GPU quota")


def test_an_unreadable_gpu_quota_fails_saying_why(local):
    # Editors hold every get permission; a project whose caller is only a viewer of Resource Manager
    # and Service Usage, not of Cloud Quotas, cannot read it.
    resource = f"projects/{PROJECT}"
    projects = local.clients(PROJECT).projects
    policy = projects.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=resource))
    updated = policy_pb2.Policy(etag=policy.etag)
    updated.bindings.add(role="roles/owner", members=[SOMEONE])
    for role in ("roles/browser", "roles/serviceusage.serviceUsageViewer", "roles/storage.admin"):
        updated.bindings.add(role=role, members=["user:developer@example.com"])
    projects.set_iam_policy(request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=updated))
    found = checks(doctor("--json"))["gpu_quota"]
    assert found["status"] == "failed"
    assert "could not be read" in found["detail"] and "cloudquotas.quotas.get" in found["detail"]


def test_a_build_region_outside_cloud_builds_restricted_list_is_a_warning_naming_global(local):
    result = doctor("--build-location", "us-east1")
    assert result.exit_code == 2
    build = line(result, "build location")
    assert build.startswith("✗") and "--build-location global" in build
    assert "Error: 1 of 10 checks failed: build location." in result.output
    assert doctor("--build-location", "europe-west1").exit_code == 0


def other_projects_storage(local) -> storage.Client:
    """A storage client of someone else, owner of another project, holding a token the emulator issued."""
    local.emulator.access.add_project(OTHER, owner=SOMEONE)
    token = local.emulator.access.issue_token(SOMEONE)
    return storage.Client(project=OTHER, credentials=Credentials(token))


def test_a_bucket_name_taken_by_another_project_fails_and_one_of_ours_passes(local):
    theirs = other_projects_storage(local)
    theirs.create_bucket(theirs.bucket("taken-by-someone-else"), location="europe-west4")
    result = doctor("--bucket", "taken-by-someone-else")
    assert result.exit_code == 2
    bucket = line(result, "bucket")
    assert bucket.startswith("✗") and "Bucket name taken-by-someone-else is taken" in bucket
    assert "choose another with --bucket" in bucket

    ours = local.clients(PROJECT).storage
    ours.create_bucket(ours.bucket(BUCKET), location="europe-west4")
    result = doctor()
    assert result.exit_code == 0, result.output
    assert f"gs://{BUCKET} exists in this project" in line(result, "bucket")


def test_a_readable_bucket_of_another_project_is_a_warning(local):
    theirs = other_projects_storage(local)
    shared = theirs.create_bucket(theirs.bucket("shared-with-us"), location="europe-west4")
    policy = shared.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": "roles/storage.admin", "members": {"user:developer@example.com"}})
    shared.set_iam_policy(policy)
    found = checks(doctor("--json", "--bucket", "shared-with-us"))["bucket"]
    assert found["status"] == "failed" and not found["stops_up"]
    assert "belongs to another project" in found["detail"]


def test_a_project_the_caller_may_not_see_fails(local):
    local.emulator.access.add_project(OTHER, owner=SOMEONE)
    local.emulator.access.update_project(
        OTHER, lambda record: record["services"].append("cloudresourcemanager.googleapis.com")
    )
    result = doctor("--project", OTHER)
    assert result.exit_code == 2
    project = line(result, "project")
    assert (
        project.startswith("✗")
        and f"Project {OTHER} does not exist, or this account may not see it" in project
    )
    assert "Traceback" not in result.output


def test_no_credentials_fail_the_first_check_and_leave_the_cloud_unchecked(monkeypatch, tmp_path):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    result = doctor()
    assert result.exit_code == 2
    credentials = line(result, "credentials")
    assert credentials.startswith("✗") and "gcloud auth application-default login" in credentials
    assert "Cannot check without working credentials" in line(result, "billing")
    assert line(result, "GPU region").startswith("✓")  # made without a call
    assert "Traceback" not in result.output


def test_the_emulated_test_iam_permissions_refuses_wildcards(local):
    client = local.clients(PROJECT).projects
    with pytest.raises(exceptions.InvalidArgument, match="wildcards"):
        client.test_iam_permissions(
            request=iam_policy_pb2.TestIamPermissionsRequest(
                resource=f"projects/{PROJECT}", permissions=["storage.*"]
            )
        )
