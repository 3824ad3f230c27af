"""The emulator's callers, projects and billing, through the real clients (launcher/emulator/access.py)."""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner
from google.api_core import exceptions
from google.cloud import billing_v1, secretmanager_v1
from google.cloud.billing_v1.services.cloud_billing.transports.grpc import CloudBillingGrpcTransport
from google.cloud.secretmanager_v1.services.secret_manager_service.transports.grpc import (
    SecretManagerServiceGrpcTransport,
)

from launcher.cli import main
from launcher.emulator.server import Emulator

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
        )

    monkeypatch.setattr(Emulator, "serve", serve)
    args = ["--user", "me@example.org", "--no-billing", "--iam-propagation", "0.5"]
    result = CliRunner().invoke(main, ["emulator", "start", "--data-dir", str(tmp_path / "d"), *args])
    assert result.exit_code == 0, result.output
    assert seen == {"user": "user:me@example.org", "billing": False, "propagation": 0.5}
