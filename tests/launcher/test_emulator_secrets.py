import google_crc32c
import pytest
from google.api_core import exceptions
from google.iam.v1 import policy_pb2

from launcher.emulator.rpc import ApiError
from launcher.emulator.secretmanager import project_number

PROJECT = "demo-project"
NUMBER = project_number(PROJECT)
ACCOUNT = f"gemma-trainer@{PROJECT}.iam.gserviceaccount.com"


def _create(secrets, secret_id: str = "HF_TOKEN"):
    return secrets.create_secret(
        request={
            "parent": f"projects/{PROJECT}",
            "secret_id": secret_id,
            "secret": {"replication": {"automatic": {}}, "labels": {"app": "gemma"}},
        }
    )


def _add(secrets, secret, data: bytes, **payload):
    return secrets.add_secret_version(request={"parent": secret, "payload": {"data": data, **payload}})


def _service_account(local) -> None:
    local.clients().iam.create_service_account(
        request={"name": f"projects/{PROJECT}", "account_id": "gemma-trainer"}
    )


def test_secret_lifecycle_with_project_number_names(local):
    secrets = local.clients().secrets
    secret = _create(secrets)
    # The real service names resources by project number, whatever the request used.
    assert secret.name == f"projects/{NUMBER}/secrets/HF_TOKEN"
    assert secret.labels == {"app": "gemma"}
    assert secret.etag
    assert secrets.get_secret(name=f"projects/{PROJECT}/secrets/HF_TOKEN").name == secret.name
    assert [s.name for s in secrets.list_secrets(parent=f"projects/{PROJECT}")] == [secret.name]
    with pytest.raises(exceptions.AlreadyExists):
        _create(secrets)

    secrets.delete_secret(name=secret.name)
    with pytest.raises(exceptions.NotFound):
        secrets.get_secret(name=secret.name)
    assert list(secrets.list_secrets(parent=f"projects/{PROJECT}")) == []


@pytest.mark.parametrize("secret_id", ["", "has.dot", "has space", "x" * 256, "slash/inside"])
def test_secret_id_rules(local, secret_id):
    with pytest.raises(exceptions.InvalidArgument):
        _create(local.clients().secrets, secret_id)


@pytest.mark.parametrize(
    "labels",
    [
        {"Managed-By": "gemma-launch"},
        {"managed-by": "Gemma"},
        {"1st": "x"},
        {"managed.by": "x"},
        {"k" * 64: "x"},
        {"k": "v" * 64},
        {f"k{i}": "v" for i in range(65)},
    ],
)
def test_secret_labels_follow_the_documented_rules(local, labels):
    # resources.proto, Secret.labels: lower-case keys starting with a letter, lower-case values, <= 64.
    secrets = local.clients().secrets
    secret = {"replication": {"automatic": {}}, "labels": labels}
    with pytest.raises(exceptions.InvalidArgument, match="label"):
        secrets.create_secret(request={"parent": f"projects/{PROJECT}", "secret_id": "S", "secret": secret})
    created = _create(secrets)
    with pytest.raises(exceptions.InvalidArgument, match="label"):
        secrets.update_secret(
            request={"secret": {"name": created.name, "labels": labels}, "update_mask": {"paths": ["labels"]}}
        )
    fine = {"managed-by": "gemma-launch", "été": "clé_1", "empty": ""}
    updated = secrets.update_secret(
        request={"secret": {"name": created.name, "labels": fine}, "update_mask": {"paths": ["labels"]}}
    )
    assert dict(updated.labels) == fine


def test_create_requires_replication(local):
    with pytest.raises(exceptions.InvalidArgument):
        local.clients().secrets.create_secret(
            request={"parent": f"projects/{PROJECT}", "secret_id": "S", "secret": {}}
        )


def test_versions_access_and_latest(local):
    secrets = local.clients().secrets
    secret = _create(secrets).name
    with pytest.raises(exceptions.NotFound):
        secrets.access_secret_version(name=f"{secret}/versions/latest")
    first = _add(secrets, secret, b"hf_first")
    second = _add(secrets, secret, b"hf_second", data_crc32c=google_crc32c.value(b"hf_second"))
    assert first.name == f"{secret}/versions/1"
    assert second.name == f"{secret}/versions/2"
    assert not first.client_specified_payload_checksum
    assert second.client_specified_payload_checksum

    latest = secrets.access_secret_version(name=f"projects/{PROJECT}/secrets/HF_TOKEN/versions/latest")
    assert latest.name == second.name
    assert latest.payload.data == b"hf_second"
    assert latest.payload.data_crc32c == google_crc32c.value(b"hf_second")
    assert secrets.access_secret_version(name=first.name).payload.data == b"hf_first"
    listed = secrets.list_secret_versions(parent=secret)
    assert [v.name for v in listed] == [second.name, first.name]

    # Disabled versions cannot be read, and "latest" is the newest version whatever its state.
    disabled = secrets.disable_secret_version(name=second.name)
    assert disabled.state.name == "DISABLED"
    with pytest.raises(exceptions.FailedPrecondition):
        secrets.access_secret_version(name=f"{secret}/versions/latest")
    enabled = [
        v.name for v in secrets.list_secret_versions(request={"parent": secret, "filter": "state:ENABLED"})
    ]
    assert enabled == [first.name]

    destroyed = secrets.destroy_secret_version(name=first.name)
    assert destroyed.state.name == "DESTROYED"
    assert destroyed.destroy_time
    with pytest.raises(exceptions.FailedPrecondition):
        secrets.access_secret_version(name=first.name)
    with pytest.raises(exceptions.NotFound):
        secrets.get_secret_version(name=f"{secret}/versions/9")


def test_payload_checksum_is_verified(local):
    secrets = local.clients().secrets
    secret = _create(secrets).name
    with pytest.raises(exceptions.InvalidArgument) as raised:
        _add(secrets, secret, b"hf_secret_value", data_crc32c=google_crc32c.value(b"something else"))
    assert "hf_secret_value" not in str(raised.value)
    assert list(secrets.list_secret_versions(parent=secret)) == []


def test_add_version_to_missing_secret_is_not_found(local):
    with pytest.raises(exceptions.NotFound):
        _add(local.clients().secrets, f"projects/{PROJECT}/secrets/missing", b"x")


def test_iam_policy_round_trip_and_stale_etag(local):
    _service_account(local)
    secrets = local.clients().secrets
    secret = _create(secrets).name
    policy = secrets.get_iam_policy(request={"resource": secret})
    assert list(policy.bindings) == []
    policy.bindings.add(role="roles/secretmanager.secretAccessor", members=[f"serviceAccount:{ACCOUNT}"])
    updated = secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    assert updated.etag != policy.etag
    read = secrets.get_iam_policy(request={"resource": f"projects/{PROJECT}/secrets/HF_TOKEN"})
    assert [(b.role, list(b.members)) for b in read.bindings] == [
        ("roles/secretmanager.secretAccessor", [f"serviceAccount:{ACCOUNT}"])
    ]
    assert read.etag == updated.etag

    # A read-modify-write based on the first read lost the race: the real API answers ABORTED.
    policy.bindings.add(role="roles/secretmanager.viewer", members=[f"serviceAccount:{ACCOUNT}"])
    with pytest.raises(exceptions.Aborted):
        secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    assert len(secrets.get_iam_policy(request={"resource": secret}).bindings) == 1

    allowed = secrets.test_iam_permissions(
        request={"resource": secret, "permissions": ["secretmanager.versions.access"]}
    )
    assert list(allowed.permissions) == ["secretmanager.versions.access"]


@pytest.mark.parametrize(
    "binding",
    [
        {"role": "roles/storage.objectAdmin", "members": [f"serviceAccount:{ACCOUNT}"]},
        {"role": "roles/secretmanager.secretAccessor", "members": ["not-a-member"]},
        {
            "role": "roles/secretmanager.secretAccessor",
            "members": [f"serviceAccount:nobody@{PROJECT}.iam.gserviceaccount.com"],
        },
    ],
)
def test_set_iam_policy_rejects_what_iam_rejects(local, binding):
    _service_account(local)
    secrets = local.clients().secrets
    secret = _create(secrets).name
    with pytest.raises(exceptions.InvalidArgument):
        secrets.set_iam_policy(request={"resource": secret, "policy": policy_pb2.Policy(bindings=[binding])})


def test_resolve_and_can_access_for_other_emulators(local):
    _service_account(local)
    secrets = local.clients().secrets
    secret = _create(secrets).name
    manager = local.emulator.services["secrets"]
    with pytest.raises(ApiError) as missing:
        manager.resolve(secret, "latest")
    assert missing.value.code.name == "NOT_FOUND"

    version = _add(secrets, secret, b"hf_token_value")
    assert manager.resolve(f"projects/{PROJECT}/secrets/HF_TOKEN", "latest") == b"hf_token_value"
    assert manager.resolve("HF_TOKEN", "1", project=PROJECT) == b"hf_token_value"
    secrets.disable_secret_version(name=version.name)
    with pytest.raises(ApiError) as disabled:
        manager.resolve(secret, "1")
    assert disabled.value.code.name == "FAILED_PRECONDITION"
    assert "hf_token_value" not in disabled.value.message

    member = f"serviceAccount:{ACCOUNT}"
    assert not manager.can_access(secret, member)
    policy = secrets.get_iam_policy(request={"resource": secret})
    policy.bindings.add(role="roles/secretmanager.viewer", members=[member])
    policy = secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    # Viewing metadata is not reading the payload.
    assert not manager.can_access(secret, member)
    policy.bindings.add(role="roles/secretmanager.secretAccessor", members=[member])
    secrets.set_iam_policy(request={"resource": secret, "policy": policy})
    assert manager.can_access(f"projects/{PROJECT}/secrets/HF_TOKEN", member)
    assert manager.can_access("HF_TOKEN", member, project=PROJECT)
    assert not manager.can_access(secret, f"serviceAccount:other@{PROJECT}.iam.gserviceaccount.com")


def test_every_call_is_recorded_and_marked_mutating_or_not(local):
    secrets = local.clients().secrets
    secret = _create(secrets).name
    _add(secrets, secret, b"hf_recorded")
    secrets.access_secret_version(name=f"{secret}/versions/1")
    methods = [(entry["method"], entry["mutating"]) for entry in local.record()]
    assert methods == [("CreateSecret", True), ("AddSecretVersion", True), ("AccessSecretVersion", False)]


def test_a_secret_policy_with_conditions_is_read_and_written_only_as_version_3(local):
    # google/iam/v1/policy.proto, Policy.version; https://cloud.google.com/iam/docs/troubleshooting-withcond
    _service_account(local)
    secrets = local.clients().secrets
    secret = _create(secrets).name
    member = f"serviceAccount:{ACCOUNT}"
    expiring = {"title": "until 2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}
    conditional = policy_pb2.Policy(
        bindings=[{"role": "roles/secretmanager.secretAccessor", "members": [member], "condition": expiring}]
    )
    with pytest.raises(exceptions.InvalidArgument, match="version 3"):
        secrets.set_iam_policy(request={"resource": secret, "policy": conditional})
    conditional.version = 3
    secrets.set_iam_policy(request={"resource": secret, "policy": conditional})

    v1 = secrets.get_iam_policy(request={"resource": secret})
    assert v1.version == 1
    assert v1.bindings[0].role.startswith("roles/secretmanager.secretAccessor_withcond_")
    v1.bindings.add(role="roles/secretmanager.viewer", members=[member])
    with pytest.raises(exceptions.InvalidArgument, match="version 3"):
        secrets.set_iam_policy(request={"resource": secret, "policy": v1})

    v3 = secrets.get_iam_policy(request={"resource": secret, "options": {"requested_policy_version": 3}})
    assert v3.version == 3 and v3.bindings[0].condition.title == "until 2030"
    with pytest.raises(exceptions.InvalidArgument, match="requested policy version"):
        secrets.get_iam_policy(request={"resource": secret, "options": {"requested_policy_version": 2}})
