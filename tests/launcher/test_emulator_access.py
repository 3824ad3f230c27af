"""The emulator's callers, projects and billing, through the real clients (launcher/emulator/access.py)."""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner
from google.api_core import exceptions
from google.cloud import billing_v1, secretmanager_v1, service_usage_v1
from google.cloud.billing_v1.services.cloud_billing.transports.grpc import CloudBillingGrpcTransport
from google.cloud.secretmanager_v1.services.secret_manager_service.transports.grpc import (
    SecretManagerServiceGrpcTransport,
)

from launcher.cli import main
from launcher.cloud import Clients
from launcher.emulator.server import Emulator
from tests.support.emulator import emulated

PROJECT = "demo-project"


def test_a_token_the_emulator_never_issued_is_unauthenticated(local):
    client = secretmanager_v1.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(local.emulator.host))
    )
    with pytest.raises(exceptions.Unauthenticated):
        client.list_secrets(parent=f"projects/{PROJECT}", metadata=[("authorization", "Bearer forged")])


def test_a_token_of_a_member_without_roles_is_denied_naming_the_permission(local):
    token = local.emulator.access.issue_token("user:nobody@example.com")
    client = secretmanager_v1.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(local.emulator.host))
    )
    with pytest.raises(exceptions.PermissionDenied) as denied:
        client.list_secrets(parent=f"projects/{PROJECT}", metadata=[("authorization", f"Bearer {token}")])
    assert denied.value.reason == "IAM_PERMISSION_DENIED"
    assert "secretmanager.secrets.list" in denied.value.message


def test_billing_is_on_unless_the_emulator_is_started_without_it(tmp_path):
    for billing in (True, False):
        apis = ("cloudbilling.googleapis.com",)
        with Emulator(data_dir=tmp_path / str(billing), billing=billing, enabled_apis=apis) as emulator:
            client = billing_v1.CloudBillingClient(
                transport=CloudBillingGrpcTransport(channel=grpc.insecure_channel(emulator.host))
            )
            info = client.get_project_billing_info(name=f"projects/{PROJECT}")
            assert info.billing_enabled is billing


def test_emulator_start_takes_the_user_billing_and_propagation(monkeypatch, tmp_path):
    seen = {}

    def serve(emulator: Emulator) -> None:  # instead of serving until Ctrl-C
        seen.update(
            user=emulator.access.user,
            billing=emulator.access.billing_enabled,
            propagation=emulator.access.propagation_s,
            api_propagation=emulator.access.api_propagation_s,
            grant_propagation=emulator.access.grant_propagation_s,
        )

    monkeypatch.setattr(Emulator, "serve", serve)
    args = ["--user", "me@example.org", "--no-billing", "--iam-propagation", "0.5", "--api-propagation", "3"]
    args += ["--grant-propagation", "4"]
    result = CliRunner().invoke(main, ["emulator", "start", "--data-dir", str(tmp_path / "d"), *args])
    assert result.exit_code == 0, result.output
    assert seen == {
        "user": "user:me@example.org",
        "billing": False,
        "propagation": 0.5,
        "api_propagation": 3,
        "grant_propagation": 4,
    }


def test_a_just_enabled_api_answers_service_disabled_until_it_has_propagated(tmp_path):
    """Service Usage reports the API ENABLED at once, but its own servers learn of it later: meanwhile
    each call answers the SERVICE_DISABLED error whose message says to wait and retry."""
    with emulated(tmp_path, api_propagation_s=60.0) as emulator:
        clients = Clients(PROJECT)
        name = f"projects/{PROJECT}/services/secretmanager.googleapis.com"
        clients.service_usage.batch_enable_services(
            request=service_usage_v1.BatchEnableServicesRequest(
                parent=f"projects/{PROJECT}", service_ids=["secretmanager.googleapis.com"]
            )
        ).result()
        enabled = clients.service_usage.get_service(request=service_usage_v1.GetServiceRequest(name=name))
        assert enabled.state == service_usage_v1.State.ENABLED
        with pytest.raises(exceptions.PermissionDenied) as early:
            clients.secrets.list_secrets(parent=f"projects/{PROJECT}")
        assert early.value.reason == "SERVICE_DISABLED"
        assert early.value.metadata["service"] == "secretmanager.googleapis.com"
        assert "If you enabled this API recently, wait a few minutes" in early.value.message
        # Other APIs, on from the start, are served meanwhile.
        assert list(clients.storage.list_buckets()) == []
        emulator.access.api_propagation_s = 0.0  # a minute later
        assert list(clients.secrets.list_secrets(parent=f"projects/{PROJECT}")) == []


def test_a_role_just_granted_takes_effect_later_and_one_removed_stops_at_once(local):
    """Google: "Changes to allow or deny policies typically propagate in 2 minutes, but could potentially
    take 7 minutes or longer" (iam/docs/access-change-propagation). Meanwhile the member is refused as if
    it held no role; a binding it already held stays in effect through later writes of the policy."""
    member = "user:reader@example.com"
    token = local.emulator.access.issue_token(member)
    client = secretmanager_v1.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=grpc.insecure_channel(local.emulator.host))
    )
    as_reader = [("authorization", f"Bearer {token}")]
    projects = local.clients(PROJECT).projects
    resource = f"projects/{PROJECT}"

    def grant(role: str) -> None:
        policy = projects.get_iam_policy(request={"resource": resource})
        policy.bindings.add(role=role, members=[member])
        projects.set_iam_policy(request={"resource": resource, "policy": policy})

    local.emulator.access.grant_propagation_s = 60.0
    grant("roles/secretmanager.viewer")
    with pytest.raises(exceptions.PermissionDenied) as early:
        client.list_secrets(parent=resource, metadata=as_reader)
    assert early.value.reason == "IAM_PERMISSION_DENIED"
    local.emulator.access.grants_propagated()  # minutes later
    assert list(client.list_secrets(parent=resource, metadata=as_reader)) == []
    # Another grant to the same member leaves the first in effect, and is itself pending.
    grant("roles/viewer")
    assert list(client.list_secrets(parent=resource, metadata=as_reader)) == []
    assert not local.emulator.access.allowed(member, "run.jobs.get", PROJECT, resource)
    # Removed: refused at once.
    policy = projects.get_iam_policy(request={"resource": resource})
    kept = [b for b in policy.bindings if member not in b.members]
    del policy.bindings[:]
    policy.bindings.extend(kept)
    projects.set_iam_policy(request={"resource": resource, "policy": policy})
    with pytest.raises(exceptions.PermissionDenied):
        client.list_secrets(parent=resource, metadata=as_reader)
