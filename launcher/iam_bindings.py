"""IAM bindings: each service account's roles, granted on the one resource that needs them (the
bucket, the repository, the secret), or on the project where the role has no narrower scope.

Each ensure_* reads the policy first and adds only a missing member, as a read-modify-write with the
policy's etag, so a concurrent writer's change is re-read, not overwritten. In a dry run before the
resource exists, the binding is reported as one to create.
"""

from __future__ import annotations

from typing import Any

from google.api_core import exceptions
from google.api_core.retry import Retry, if_exception_type
from google.iam.v1 import iam_policy_pb2, options_pb2, policy_pb2

from launcher.changes import Change
from launcher.cloud import RETRY, Clients, retry_deadline_s
from launcher.cloud_errors import explained
from launcher.settings import Settings

OBJECT_USER = "roles/storage.objectUser"
# What `up` granted the job's account before objectUser: the same object access plus setting IAM policies
# on objects and managed folders, which the job never does. up replaces it, down removes it too.
OBJECT_ADMIN = "roles/storage.objectAdmin"
OBJECT_VIEWER = "roles/storage.objectViewer"
SECRET_ACCESSOR = "roles/secretmanager.secretAccessor"
REGISTRY_WRITER = "roles/artifactregistry.writer"
LOG_WRITER = "roles/logging.logWriter"

# A new service account takes a while to be visible to other services' IAM: Cloud Storage answers 400
# and Secret Manager INVALID_ARGUMENT "does not exist" meanwhile
# (https://cloud.google.com/iam/docs/service-accounts-create#creating). Retry just that case, for as
# long as transient errors are retried, so a give-up message names the right duration.
_NEW_MEMBER_RETRY = Retry(
    predicate=lambda error: (
        isinstance(error, exceptions.BadRequest | exceptions.InvalidArgument)
        and "does not exist" in str(error)
    ),
    initial=1.0,
    maximum=8.0,
    timeout=retry_deadline_s(),
)


# A concurrent SetIamPolicy changed the etag: read again and re-apply. gRPC APIs answer ABORTED, Cloud
# Storage 412 (https://cloud.google.com/storage/docs/json_api/v1/buckets/setIamPolicy).
_POLICY_RACE_RETRY = Retry(
    predicate=if_exception_type(exceptions.Aborted, exceptions.Conflict, exceptions.PreconditionFailed),
    timeout=retry_deadline_s(),
)


def bucket_grants(policy: Any, member: str, *roles: str) -> bool:
    """Whether a bucket's policy (google-cloud-storage's Policy) binds `member` to any of `roles`."""
    return any(b["role"] in roles and member in b["members"] for b in policy.bindings)


def _ensure_bucket_role(
    clients: Clients, settings: Settings, email: str, role: str, *, dry_run: bool, replaces: str = ""
) -> Change:
    """Grant `role`, and take the member out of `replaces` (a wider role granted before) in the same write."""
    member = f"serviceAccount:{email}"
    label = f"{role} on gs://{settings.bucket}"
    command = (
        f"gcloud storage buckets add-iam-policy-binding gs://{settings.bucket} "
        f"--member={member} --role={role}"
    )
    with explained("bucket IAM", label, settings):
        if dry_run and clients.storage.lookup_bucket(settings.bucket, retry=RETRY) is None:
            return Change("bucket IAM", label, "would create", command)
        bucket = clients.storage.bucket(settings.bucket)

        def grant() -> bool:
            policy = bucket.get_iam_policy(requested_policy_version=3, retry=RETRY)
            held = bucket_grants(policy, member, role)
            wider = bucket_grants(policy, member, replaces)
            if held and not wider:
                return False
            if dry_run:
                return True
            for binding in policy.bindings:
                if binding["role"] == replaces:
                    binding["members"].discard(member)
            policy.bindings = [b for b in policy.bindings if b["members"]]
            if not held:
                policy.bindings.append({"role": role, "members": {member}})
            bucket.set_iam_policy(policy, retry=RETRY)
            return True

        changed = _NEW_MEMBER_RETRY(_POLICY_RACE_RETRY(grant))()
    return _binding_change("bucket IAM", label, changed, dry_run, command)


def ensure_bucket_iam(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    """The job reads weights and data and writes checkpoints and results through the bucket mount: the
    object access gcsfuse needs (https://cloud.google.com/storage/docs/cloud-storage-fuse/mount-bucket),
    not the project-wide roles/storage.admin Cloud Run's mount page asks for."""
    return _ensure_bucket_role(
        clients,
        settings,
        settings.service_account_email,
        OBJECT_USER,
        dry_run=dry_run,
        replaces=OBJECT_ADMIN,
    )


def ensure_build_source_access(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    """The build fetches its source archive from the bucket; nothing else there concerns it."""
    return _ensure_bucket_role(
        clients, settings, settings.build_service_account_email, OBJECT_VIEWER, dry_run=dry_run
    )


def _ensure_policy_binding(client: Any, resource: str, role: str, member: str, *, dry_run: bool) -> bool:
    """Add `member` to `role` in `resource`'s IAM policy through a gRPC client's get_iam_policy and
    set_iam_policy (a read-modify-write with the policy's etag); True if it was (or would be) added."""

    def grant() -> bool:
        # Version 3, or a policy with conditional bindings (common on projects) reads as version 1 with
        # those bindings mangled, and writing it back is refused
        # (https://cloud.google.com/iam/docs/troubleshooting-withcond).
        policy = client.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(
                resource=resource, options=options_pb2.GetPolicyOptions(requested_policy_version=3)
            ),
            retry=RETRY,
        )
        for binding in policy.bindings:
            # A conditional binding (one that expires, say) is not the grant asked for.
            if binding.role == role and member in binding.members and not binding.HasField("condition"):
                return False
        if dry_run:
            return True
        updated = policy_pb2.Policy()
        updated.CopyFrom(policy)
        for binding in updated.bindings:
            if binding.role == role and not binding.HasField("condition"):
                binding.members.append(member)
                break
        else:
            updated.bindings.add(role=role, members=[member])
        client.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=updated), retry=RETRY
        )
        return True

    return _NEW_MEMBER_RETRY(_POLICY_RACE_RETRY(grant))()


def ensure_repository_access(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    """The build pushes the image into the one repository (https://cloud.google.com/artifact-registry/docs/access-control)."""
    member = f"serviceAccount:{settings.build_service_account_email}"
    label = f"{REGISTRY_WRITER} on {settings.repository}"
    command = (
        f"gcloud artifacts repositories add-iam-policy-binding {settings.repository} "
        f"--location={settings.region} --project={settings.project_id} --member={member} "
        f"--role={REGISTRY_WRITER}"
    )
    with explained("repository IAM", label, settings):
        if dry_run and missing_repository(clients, settings):
            return Change("repository IAM", label, "would create", command)
        changed = _ensure_policy_binding(
            clients.registry, settings.repository_name, REGISTRY_WRITER, member, dry_run=dry_run
        )
    return _binding_change("repository IAM", label, changed, dry_run, command)


def ensure_build_log_writer(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    """A build's logs are written as its service account; logWriter exists only at project level."""
    member = f"serviceAccount:{settings.build_service_account_email}"
    resource = f"projects/{settings.project_id}"
    label = f"{LOG_WRITER} on project {settings.project_id}"
    command = (
        f"gcloud projects add-iam-policy-binding {settings.project_id} --member={member} --role={LOG_WRITER} "
        "--condition=None"
    )
    with explained("project IAM", label, settings):
        changed = _ensure_policy_binding(clients.projects, resource, LOG_WRITER, member, dry_run=dry_run)
    return _binding_change("project IAM", label, changed, dry_run, command)


def missing_repository(clients: Clients, settings: Settings) -> bool:
    try:
        clients.registry.get_repository(name=settings.repository_name, retry=RETRY)
        return False
    except exceptions.NotFound:
        return True


def ensure_secret_access(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    member = f"serviceAccount:{settings.service_account_email}"
    label = f"{SECRET_ACCESSOR} on {settings.secret_id}"
    command = (
        f"gcloud secrets add-iam-policy-binding {settings.secret_id} --member={member} "
        f"--role={SECRET_ACCESSOR} --project={settings.project_id}"
    )
    with explained("secret IAM", label, settings):
        if dry_run and missing_secret(clients, settings):
            return Change("secret IAM", label, "would create", command)
        changed = _ensure_policy_binding(
            clients.secrets, settings.secret_name, SECRET_ACCESSOR, member, dry_run=dry_run
        )
    return _binding_change("secret IAM", label, changed, dry_run, command)


def missing_secret(clients: Clients, settings: Settings) -> bool:
    try:
        clients.secrets.get_secret(name=settings.secret_name, retry=RETRY)
        return False
    except exceptions.NotFound:
        return True


def _binding_change(kind: str, label: str, changed: bool, dry_run: bool, command: str) -> Change:
    if not changed:
        return Change(kind, label, "unchanged")
    return Change(kind, label, "would create" if dry_run else "created", command)
