import grpc
import pytest
from google.api_core import exceptions
from google.cloud import artifactregistry_v1, secretmanager_v1
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)

PROJECT = "demo-project"
V3 = {"requested_policy_version": 3}


def _access_as(local, member: str, version: str) -> bytes:
    """The payload `member` reads with a token of its own, as a task running as it would."""
    channel = grpc.insecure_channel(local.emulator.host)
    client = secretmanager_v1.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=channel)
    )
    token = local.emulator.access.issue_token(member)
    return client.access_secret_version(
        name=version, metadata=[("authorization", f"Bearer {token}")]
    ).payload.data


def _members(policy, role: str) -> set[str]:
    return {member for binding in policy.bindings if binding["role"] == role for member in binding["members"]}


def test_service_account_create_get_and_conflict(local):
    iam = local.clients().iam
    account = iam.create_service_account(
        request={"name": "projects/demo-project", "account_id": "gemma-trainer"}
    )
    assert account.email == "gemma-trainer@demo-project.iam.gserviceaccount.com"
    assert iam.get_service_account(name=account.name).email == account.email
    with pytest.raises(exceptions.AlreadyExists):
        iam.create_service_account(request={"name": "projects/demo-project", "account_id": "gemma-trainer"})
    methods = [entry["method"] for entry in local.record()]
    assert methods == ["CreateServiceAccount", "GetServiceAccount", "CreateServiceAccount"]


@pytest.mark.parametrize("account_id", ["ab", "Upper-case", "ends-with-", "9starts-with-digit"])
def test_service_account_rejects_names_iam_rejects(local, account_id):
    with pytest.raises(exceptions.InvalidArgument):
        local.clients().iam.create_service_account(
            request={"name": "projects/demo-project", "account_id": account_id}
        )


def test_unknown_service_account_is_not_found(local):
    with pytest.raises(exceptions.NotFound):
        local.clients().iam.get_service_account(
            name="projects/demo-project/serviceAccounts/nobody@demo-project.iam.gserviceaccount.com"
        )


@pytest.mark.parametrize(
    "account", [{"display_name": "x" * 101}, {"display_name": "é" * 51}, {"description": "x" * 257}]
)
def test_service_account_display_name_and_description_have_byte_limits(local, account):
    # iam.proto: display_name at most 100 UTF-8 bytes, description at most 256.
    with pytest.raises(exceptions.InvalidArgument, match="UTF-8 bytes"):
        local.clients().iam.create_service_account(
            request={
                "name": "projects/demo-project",
                "account_id": "gemma-trainer",
                "service_account": account,
            }
        )
    local.clients().iam.create_service_account(
        request={
            "name": "projects/demo-project",
            "account_id": "gemma-trainer",
            "service_account": {"display_name": "x" * 100, "description": "x" * 256},
        }
    )


def test_a_deleted_accounts_grants_name_it_deleted_and_a_new_account_of_its_email_inherits_none(local):
    # https://cloud.google.com/iam/docs/service-accounts-delete-undelete: "If you delete a service
    # account, then create a new service account with the same name, the new service account is treated
    # as a separate identity; it does not inherit the roles granted to the deleted service account."
    # Its members read deleted:serviceAccount:EMAIL?uid=ID (google/iam/v1/policy.proto, Binding.members).
    clients = local.clients()
    create = {"name": f"projects/{PROJECT}", "account_id": "gemma-trainer"}
    account = clients.iam.create_service_account(request=create)
    member = f"serviceAccount:{account.email}"
    secret = clients.secrets.create_secret(
        request={
            "parent": f"projects/{PROJECT}",
            "secret_id": "HF_TOKEN",
            "secret": {"replication": {"automatic": {}}},
        }
    ).name
    clients.secrets.add_secret_version(request={"parent": secret, "payload": {"data": b"hf_x"}})
    repository = (
        clients.registry.create_repository(
            request={
                "parent": f"projects/{PROJECT}/locations/europe-west4",
                "repository_id": "gemma",
                "repository": {"format_": artifactregistry_v1.Repository.Format.DOCKER},
            }
        )
        .result()
        .name
    )
    grpc_policies = {
        clients.projects: (f"projects/{PROJECT}", "roles/logging.logWriter"),
        clients.secrets: (secret, "roles/secretmanager.secretAccessor"),
        clients.registry: (repository, "roles/artifactregistry.writer"),
    }
    for client, (resource, role) in grpc_policies.items():
        policy = client.get_iam_policy(request={"resource": resource, "options": V3})
        policy.bindings.add(role=role, members=[member])
        client.set_iam_policy(request={"resource": resource, "policy": policy})
    bucket = clients.storage.create_bucket("demo-project-gemma3")
    bucket_policy = bucket.get_iam_policy(requested_policy_version=3)
    bucket_policy.bindings.append({"role": "roles/storage.objectAdmin", "members": {member}})
    bucket.set_iam_policy(bucket_policy)
    assert _access_as(local, member, f"{secret}/versions/1") == b"hf_x"

    clients.iam.delete_service_account(name=account.name)
    deleted = f"deleted:{member}?uid={account.unique_id}"
    for client, (resource, role) in grpc_policies.items():
        policy = client.get_iam_policy(request={"resource": resource, "options": V3})
        assert [list(b.members) for b in policy.bindings if b.role == role] == [[deleted]], resource
    assert _members(bucket.get_iam_policy(requested_policy_version=3), "roles/storage.objectAdmin") == {
        deleted
    }

    again = clients.iam.create_service_account(request=create)
    assert again.email == account.email and again.unique_id != account.unique_id
    with pytest.raises(exceptions.PermissionDenied):
        _access_as(local, member, f"{secret}/versions/1")
    # A read-modify-write of a policy holding the deleted member writes it back as it is.
    policy = clients.secrets.get_iam_policy(request={"resource": secret, "options": V3})
    policy.bindings.add(role="roles/secretmanager.secretAccessor", members=[member])
    clients.secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    assert _access_as(local, member, f"{secret}/versions/1") == b"hf_x"


def test_a_token_issued_before_its_account_was_deleted_is_rejected_even_after_the_email_is_reused(local):
    # A token names the identity it was issued to: once that account is gone (deleted, or deleted and
    # made again under its email, a separate identity) the token is rejected, UNAUTHENTICATED.
    clients = local.clients()
    create = {"name": f"projects/{PROJECT}", "account_id": "gemma-trainer"}
    account = clients.iam.create_service_account(request=create)
    member = f"serviceAccount:{account.email}"
    policy = clients.projects.get_iam_policy(request={"resource": f"projects/{PROJECT}", "options": V3})
    policy.bindings.add(role="roles/iam.serviceAccountUser", members=[member])
    clients.projects.set_iam_policy(request={"resource": f"projects/{PROJECT}", "policy": policy})
    token = local.emulator.access.issue_token(member)

    def get_as_token():
        return clients.iam.get_service_account(
            name=account.name, metadata=[("authorization", f"Bearer {token}")]
        )

    assert get_as_token().unique_id == account.unique_id
    clients.iam.delete_service_account(name=account.name)
    with pytest.raises(exceptions.Unauthenticated, match="invalid authentication credentials"):
        get_as_token()
    clients.iam.create_service_account(request=create)
    with pytest.raises(exceptions.Unauthenticated):
        get_as_token()


def test_a_disabled_account_keeps_its_grants_its_tokens_are_refused_until_it_is_enabled_again(local):
    # https://cloud.google.com/iam/docs/reference/rest/v1/projects.serviceAccounts/disable: "Existing
    # access tokens for the service account are rejected"; after enable "its existing access tokens will
    # be accepted". Disabling or enabling twice has no further effect.
    clients = local.clients()
    account = clients.iam.create_service_account(
        request={"name": f"projects/{PROJECT}", "account_id": "gemma-trainer"}
    )
    member = f"serviceAccount:{account.email}"
    secret = clients.secrets.create_secret(
        request={
            "parent": f"projects/{PROJECT}",
            "secret_id": "HF_TOKEN",
            "secret": {"replication": {"automatic": {}}},
        }
    ).name
    clients.secrets.add_secret_version(request={"parent": secret, "payload": {"data": b"hf_x"}})
    policy = clients.secrets.get_iam_policy(request={"resource": secret, "options": V3})
    policy.bindings.add(role="roles/secretmanager.secretAccessor", members=[member])
    clients.secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    channel = grpc.insecure_channel(local.emulator.host)
    as_account = secretmanager_v1.SecretManagerServiceClient(
        transport=SecretManagerServiceGrpcTransport(channel=channel)
    )
    token = local.emulator.access.issue_token(member)

    def read():
        return as_account.access_secret_version(
            name=f"{secret}/versions/1", metadata=[("authorization", f"Bearer {token}")]
        ).payload.data

    assert read() == b"hf_x"
    assert clients.iam.get_service_account(name=account.name).disabled is False
    for _ in range(2):
        clients.iam.disable_service_account(request={"name": account.name})
        assert clients.iam.get_service_account(name=account.name).disabled is True
        with pytest.raises(exceptions.Unauthenticated, match="invalid authentication credentials"):
            read()
    policy = clients.secrets.get_iam_policy(request={"resource": secret, "options": V3})
    assert [list(b.members) for b in policy.bindings if b.role == "roles/secretmanager.secretAccessor"] == [
        [member]
    ]
    for _ in range(2):
        clients.iam.enable_service_account(request={"name": account.name})
        assert clients.iam.get_service_account(name=account.name).disabled is False
        assert read() == b"hf_x"


def test_disabling_or_enabling_an_account_that_does_not_exist_is_permission_denied(local):
    # gcloud iam service-accounts disable: "If the service account does not exist, this command returns
    # a PERMISSION_DENIED error."
    name = f"projects/{PROJECT}/serviceAccounts/nobody@{PROJECT}.iam.gserviceaccount.com"
    iam = local.clients().iam
    with pytest.raises(exceptions.PermissionDenied, match="iam.serviceAccounts.disable"):
        iam.disable_service_account(request={"name": name})
    with pytest.raises(exceptions.PermissionDenied, match="iam.serviceAccounts.enable"):
        iam.enable_service_account(request={"name": name})
