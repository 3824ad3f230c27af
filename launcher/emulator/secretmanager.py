"""Secret Manager v1: secrets, versions, access, and the secret's IAM policy.

Like the real service, resource names in responses carry the project *number*
(projects/123456789012/secrets/S), while requests may name the project by id or number, so callers
that compare names as strings fail here as they would in the cloud. Payloads are kept in the state
file (a local test artefact) and never appear in an error message.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import google_crc32c
import grpc
from google.cloud import secretmanager_v1
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import empty_pb2, json_format

from launcher.emulator.access import Access, project_number, rename_member
from launcher.emulator.labels import check_labels
from launcher.emulator.resourcemanager import check_version_kept, check_versioned, policy_as_requested
from launcher.emulator.rpc import (
    ApiError,
    Hub,
    Method,
    already_exists,
    failed_precondition,
    iam_policy_methods,
    invalid,
    not_found,
    service_handler,
    to_dict,
)
from launcher.emulator.state import State

_SECRET_ID = re.compile(r"^[a-zA-Z0-9_-]{1,255}$")
_PROJECT = re.compile(r"^projects/(?P<project>[^/]+)$")
_SECRET = re.compile(r"^projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/]+)$")
_VERSION = re.compile(r"^(?P<secret>projects/[^/]+/secrets/[^/]+)/versions/(?P<version>[^/]+)$")
_MEMBER = re.compile(
    r"^(?:allUsers|allAuthenticatedUsers"
    r"|(?:user|serviceAccount|group):[^@\s]+@[^@\s]+"
    r"|domain:[^\s]+|principal(?:Set)?://[^\s]+|deleted:[a-zA-Z]+:[^\s]+)$"
)
# Project-level basic roles and Secret Manager's own are grantable on a secret; anything else
# (roles/storage.objectAdmin, say) the real API refuses for this resource type.
_GRANTABLE_ROLE = re.compile(
    r"^(?:roles/(?:owner|editor|viewer|secretmanager\.[a-zA-Z]+)|(?:projects|organizations)/[^/]+/roles/.+)$"
)
_MAX_PAYLOAD = 64 * 1024
# The etag the real service shows for a resource whose policy was never set.
_EMPTY_POLICY_ETAG = base64.b64decode("ACAB")
_SECRET_PERMISSIONS = re.compile(r"^secretmanager\.[a-zA-Z]+\.[a-zA-Z]+$")

State_ = secretmanager_v1.SecretVersion.State


def _now() -> datetime:
    return datetime.now(UTC)


def _etag() -> str:
    return f'"{uuid.uuid4().hex[:14]}"'


def _page(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    if page_token and not page_token.isdigit():
        raise invalid(f"Invalid page token {page_token!r}.")
    start = int(page_token or 0)
    end = len(items) if page_size <= 0 else start + page_size
    return items[start:end], str(end) if end < len(items) else ""


class SecretManager:
    def __init__(self, state: State, access: Access) -> None:
        self.state = state
        self.access = access
        access.add_policy_source(r"^projects/[^/]+/secrets/[^/]+", self._policies_of)
        access.add_member_renamer(self._rename_member)

    def _policies_of(self, name: str) -> list[dict[str, Any]]:
        stored = self.state.table("secrets").get(self._secret_key(name))
        return [stored["policy"]] if stored and stored["policy"] else []

    def _rename_member(self, old: str, new: str) -> None:
        with self.state.transaction() as tables:
            for stored in tables["secrets"].values():
                rename_member(stored["policy"], old, new)

    # ---- names ----------------------------------------------------------------------------------

    @staticmethod
    def _secret_key(name: str, project: str | None = None) -> str:
        """projects/NUMBER/secrets/ID for a secret named by full name (id or number) or by bare id."""
        match = _SECRET.match(name)
        if match:
            return f"projects/{project_number(match['project'])}/secrets/{match['secret']}"
        if _SECRET_ID.match(name) and project:
            return f"projects/{project_number(project)}/secrets/{name}"
        raise invalid(f"Invalid secret name {name!r}: expected projects/PROJECT/secrets/SECRET.")

    def _stored(self, key: str) -> dict[str, Any]:
        stored = self.state.table("secrets").get(key)
        if stored is None:
            raise not_found(f"Secret [{key}]")
        return stored

    def _version_key(self, name: str) -> tuple[str, str]:
        """(secret key, version number) for .../versions/N, .../versions/latest or .../versions/ALIAS."""
        match = _VERSION.match(name)
        if not match:
            raise invalid(f"Invalid secret version name {name!r}: expected .../secrets/SECRET/versions/V.")
        key = self._secret_key(match["secret"])
        return key, self._version_number(key, match["version"])

    def _version_number(self, key: str, version: str) -> str:
        stored = self._stored(key)
        if version == "latest":
            # The most recently created version, whatever its state (as documented for the API).
            if not stored["versions"]:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"Secret [{key}] not found or has no versions.")
            return str(max(int(number) for number in stored["versions"]))
        if not version.isdigit():
            aliases = stored["secret"].get("versionAliases", {})
            if version not in aliases:
                raise ApiError(
                    grpc.StatusCode.NOT_FOUND, f"Secret Version [{key}/versions/{version}] not found."
                )
            return str(aliases[version])
        if version not in stored["versions"]:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"Secret Version [{key}/versions/{version}] not found.")
        return version

    @staticmethod
    def _version_message(entry: dict[str, Any]) -> secretmanager_v1.SecretVersion:
        return secretmanager_v1.SecretVersion.from_json(json.dumps(entry["version"]))

    # ---- secrets --------------------------------------------------------------------------------

    def create_secret(self, request: secretmanager_v1.CreateSecretRequest, context: grpc.ServicerContext):
        project = _PROJECT.match(request.parent)
        if not project:
            raise invalid(f"Invalid parent {request.parent!r}: expected projects/PROJECT.")
        if not _SECRET_ID.match(request.secret_id):
            raise invalid(
                f"Invalid secret id {request.secret_id!r}: 1-255 characters, letters, digits, "
                "underscores and hyphens."
            )
        if "replication" not in request.secret:
            raise invalid("Secret.replication must be set (automatic or user_managed).")
        check_labels(dict(request.secret.labels), "A secret")
        key = f"projects/{project_number(project['project'])}/secrets/{request.secret_id}"
        secret = request.secret
        secret.name = key
        secret.create_time = _now()
        secret.etag = _etag()
        with self.state.transaction() as tables:
            if key in tables["secrets"]:
                raise already_exists(f"Secret [{key}]")
            tables["secrets"][key] = {"secret": to_dict(secret), "versions": {}, "policy": None}
        return secret

    def get_secret(self, request: secretmanager_v1.GetSecretRequest, context: grpc.ServicerContext):
        stored = self._stored(self._secret_key(request.name))
        return secretmanager_v1.Secret.from_json(json.dumps(stored["secret"]))

    def list_secrets(self, request: secretmanager_v1.ListSecretsRequest, context: grpc.ServicerContext):
        project = _PROJECT.match(request.parent)
        if not project:
            raise invalid(f"Invalid parent {request.parent!r}: expected projects/PROJECT.")
        if request.filter:
            raise invalid("The emulator does not support filters on ListSecrets.")
        prefix = f"projects/{project_number(project['project'])}/secrets/"
        secrets = self.state.table("secrets")
        names = sorted(key for key in secrets if key.startswith(prefix))
        page, token = _page(names, request.page_size, request.page_token)
        return secretmanager_v1.ListSecretsResponse(
            secrets=[secretmanager_v1.Secret.from_json(json.dumps(secrets[key]["secret"])) for key in page],
            next_page_token=token,
            total_size=len(names),
        )

    def update_secret(self, request: secretmanager_v1.UpdateSecretRequest, context: grpc.ServicerContext):
        paths = list(request.update_mask.paths)
        if not paths:
            raise invalid("update_mask is required.")
        mutable = {"labels", "annotations", "version_aliases", "topics", "rotation", "expire_time", "ttl"}
        if unknown := [path for path in paths if path not in mutable]:
            raise invalid(f"Field(s) {', '.join(unknown)} cannot be updated.")
        if "labels" in paths:
            check_labels(dict(request.secret.labels), "A secret")
        key = self._secret_key(request.secret.name)
        with self.state.transaction() as tables:
            stored = tables["secrets"].get(key)
            if stored is None:
                raise not_found(f"Secret [{key}]")
            current = secretmanager_v1.Secret.from_json(json.dumps(stored["secret"]))
            if request.secret.etag and request.secret.etag != current.etag:
                raise _etag_mismatch(key)
            if "version_aliases" in paths:
                for alias, number in request.secret.version_aliases.items():
                    if str(number) not in stored["versions"]:
                        raise invalid(f"Alias {alias!r} points to version {number}, which does not exist.")
            for path in paths:
                setattr(current, path, getattr(request.secret, path))
            current.etag = _etag()
            stored["secret"] = to_dict(current)
        return current

    def delete_secret(self, request: secretmanager_v1.DeleteSecretRequest, context: grpc.ServicerContext):
        """The secret with all its versions and its policy, at once; a stale etag is refused
        (https://cloud.google.com/secret-manager/docs/delete-secret)."""
        key = self._secret_key(request.name)
        with self.state.transaction() as tables:
            stored = tables["secrets"].get(key)
            if stored is None:
                raise not_found(f"Secret [{key}]")
            if request.etag and request.etag != stored["secret"].get("etag"):
                raise _etag_mismatch(key)
            del tables["secrets"][key]
        return empty_pb2.Empty()

    # ---- versions -------------------------------------------------------------------------------

    def add_version(self, request: secretmanager_v1.AddSecretVersionRequest, context: grpc.ServicerContext):
        key = self._secret_key(request.parent)
        data = request.payload.data
        if len(data) > _MAX_PAYLOAD:
            raise invalid(f"Secret payload is {len(data)} bytes; the maximum is {_MAX_PAYLOAD} bytes.")
        checksum_given = "data_crc32c" in request.payload
        if checksum_given and request.payload.data_crc32c != google_crc32c.value(data):
            raise invalid("Checksum mismatch: payload.data_crc32c does not match the payload's CRC32C.")
        with self.state.transaction() as tables:
            stored = tables["secrets"].get(key)
            if stored is None:
                raise not_found(f"Secret [{key}]")
            number = str(max((int(n) for n in stored["versions"]), default=0) + 1)
            version = secretmanager_v1.SecretVersion(
                name=f"{key}/versions/{number}",
                create_time=_now(),
                state=State_.ENABLED,
                etag=_etag(),
                client_specified_payload_checksum=checksum_given,
                replication_status=secretmanager_v1.ReplicationStatus(
                    automatic=secretmanager_v1.ReplicationStatus.AutomaticStatus()
                ),
            )
            stored["versions"][number] = {
                "version": to_dict(version),
                "data": base64.b64encode(data).decode(),
            }
        return version

    def get_version(self, request: secretmanager_v1.GetSecretVersionRequest, context: grpc.ServicerContext):
        key, number = self._version_key(request.name)
        return self._version_message(self._stored(key)["versions"][number])

    def list_versions(
        self, request: secretmanager_v1.ListSecretVersionsRequest, context: grpc.ServicerContext
    ):
        key = self._secret_key(request.parent)
        wanted = _state_filter(request.filter)
        versions = [
            self._version_message(entry)
            for _, entry in sorted(
                self._stored(key)["versions"].items(), key=lambda item: int(item[0]), reverse=True
            )
        ]
        versions = [version for version in versions if wanted is None or version.state == wanted]
        page, token = _page(versions, request.page_size, request.page_token)
        return secretmanager_v1.ListSecretVersionsResponse(
            versions=page, next_page_token=token, total_size=len(versions)
        )

    def access_version(
        self, request: secretmanager_v1.AccessSecretVersionRequest, context: grpc.ServicerContext
    ):
        key, number = self._version_key(request.name)
        entry = self._stored(key)["versions"][number]
        version = self._version_message(entry)
        if version.state != State_.ENABLED:
            raise failed_precondition(f"Secret Version [{version.name}] is in {version.state.name} state.")
        data = base64.b64decode(entry["data"])
        return secretmanager_v1.AccessSecretVersionResponse(
            name=version.name,
            payload=secretmanager_v1.SecretPayload(data=data, data_crc32c=google_crc32c.value(data)),
        )

    def _transition(self, name: str, etag: str, change: Callable[[secretmanager_v1.SecretVersion], None]):
        key, number = self._version_key(name)
        with self.state.transaction() as tables:
            entry = tables["secrets"][key]["versions"][number]
            version = self._version_message(entry)
            if etag and etag != version.etag:
                raise _etag_mismatch(version.name)
            change(version)
            version.etag = _etag()
            entry["version"] = to_dict(version)
            if version.state == State_.DESTROYED:
                entry["data"] = None
        return version

    def disable_version(
        self, request: secretmanager_v1.DisableSecretVersionRequest, context: grpc.ServicerContext
    ):
        def disable(version: secretmanager_v1.SecretVersion) -> None:
            if version.state == State_.DESTROYED:
                raise failed_precondition(f"Secret Version [{version.name}] is in DESTROYED state.")
            version.state = State_.DISABLED

        return self._transition(request.name, request.etag, disable)

    def enable_version(
        self, request: secretmanager_v1.EnableSecretVersionRequest, context: grpc.ServicerContext
    ):
        def enable(version: secretmanager_v1.SecretVersion) -> None:
            if version.state == State_.DESTROYED:
                raise failed_precondition(f"Secret Version [{version.name}] is in DESTROYED state.")
            version.state = State_.ENABLED

        return self._transition(request.name, request.etag, enable)

    def destroy_version(
        self, request: secretmanager_v1.DestroySecretVersionRequest, context: grpc.ServicerContext
    ):
        def destroy(version: secretmanager_v1.SecretVersion) -> None:
            if version.state == State_.DESTROYED:
                raise failed_precondition(f"Secret Version [{version.name}] is already DESTROYED.")
            version.state = State_.DESTROYED
            version.destroy_time = _now()

        return self._transition(request.name, request.etag, destroy)

    # ---- IAM policy -----------------------------------------------------------------------------

    def _policy(self, key: str) -> policy_pb2.Policy:
        stored = self._stored(key)["policy"]
        if stored is None:
            return policy_pb2.Policy(etag=_EMPTY_POLICY_ETAG)
        return json_format.ParseDict(stored, policy_pb2.Policy())

    def get_iam_policy(self, request: iam_policy_pb2.GetIamPolicyRequest, context: grpc.ServicerContext):
        return policy_as_requested(self._policy(self._secret_key(request.resource)), request)

    def set_iam_policy(self, request: iam_policy_pb2.SetIamPolicyRequest, context: grpc.ServicerContext):
        key = self._secret_key(request.resource)
        policy = policy_pb2.Policy()
        policy.CopyFrom(request.policy)
        self._validate_policy(policy)
        with self.state.transaction() as tables:
            current = self._policy(key)
            if policy.etag and policy.etag != current.etag:
                raise ApiError(
                    grpc.StatusCode.ABORTED,
                    "There were concurrent policy changes. Please retry the whole read-modify-write with "
                    "exponential backoff.",
                )
            check_version_kept(current, policy)
            kept = [binding for binding in policy.bindings if binding.members]
            del policy.bindings[:]
            policy.bindings.extend(kept)
            policy.etag = uuid.uuid4().bytes[:8]
            stored = json_format.MessageToDict(policy)
            self.access.policy_replaced(tables["secrets"][key]["policy"], stored)
            tables["secrets"][key]["policy"] = stored
        return policy

    def _validate_policy(self, policy: policy_pb2.Policy) -> None:
        if policy.version not in (0, 1, 3):
            raise invalid(f"Invalid policy version {policy.version}: use 1 or 3.")
        check_versioned(policy)
        for binding in policy.bindings:
            if not _GRANTABLE_ROLE.match(binding.role):
                raise invalid(f"Role {binding.role} is not supported for this resource.")
            for member in binding.members:
                if not _MEMBER.match(member):
                    raise invalid(f"Invalid member {member!r} in the binding of {binding.role}.")
                # User-managed service accounts must exist and be known to IAM, as checked on every
                # grant; Google-managed ones (…@developer.gserviceaccount.com, agents) are not modelled.
                if unknown := self.access.unknown_member(member):
                    raise invalid(unknown)

    def test_iam_permissions(
        self, request: iam_policy_pb2.TestIamPermissionsRequest, context: grpc.ServicerContext
    ):
        key = self._secret_key(request.resource)
        self._stored(key)
        if bad := [p for p in request.permissions if not _SECRET_PERMISSIONS.match(p)]:
            raise invalid(f"Permission(s) {', '.join(bad)} are not valid for a secret.")
        caller = self.access.caller(dict(context.invocation_metadata()).get("authorization"))
        project = key.split("/")[1]
        granted = [p for p in request.permissions if self.access.allowed(caller, p, project, key)]
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    # ---- for the other emulated services --------------------------------------------------------

    def resolve(self, secret: str, version: str, *, project: str | None = None) -> bytes:
        """The payload of `secret` (projects/P/secrets/S, or S with `project`) at `version`.

        Raises ApiError NOT_FOUND for a missing secret or version, FAILED_PRECONDITION when the version
        is disabled or destroyed, INVALID_ARGUMENT for a malformed name.
        """
        key = self._secret_key(secret, project)
        number = self._version_number(key, version or "latest")
        response = self.access_version(
            secretmanager_v1.AccessSecretVersionRequest(name=f"{key}/versions/{number}"), None
        )
        return response.payload.data

    def can_access(self, secret: str, member: str, *, project: str | None = None) -> bool:
        """Whether IAM (the secret's policy or the project's) lets `member` (serviceAccount:x@...) read it.

        Raises ApiError NOT_FOUND when the secret does not exist.
        """
        key = self._secret_key(secret, project)
        self._stored(key)
        return self.access.allowed(member, "secretmanager.versions.access", key.split("/")[1], key)

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        sm = secretmanager_v1
        return service_handler(
            "google.cloud.secretmanager.v1.SecretManagerService",
            [
                Method("CreateSecret", self.create_secret, sm.CreateSecretRequest, sm.Secret),
                Method("GetSecret", self.get_secret, sm.GetSecretRequest, sm.Secret),
                Method("ListSecrets", self.list_secrets, sm.ListSecretsRequest, sm.ListSecretsResponse),
                Method("UpdateSecret", self.update_secret, sm.UpdateSecretRequest, sm.Secret),
                Method("DeleteSecret", self.delete_secret, sm.DeleteSecretRequest, empty_pb2.Empty),
                Method(
                    "AddSecretVersion",
                    self.add_version,
                    sm.AddSecretVersionRequest,
                    sm.SecretVersion,
                ),
                Method("GetSecretVersion", self.get_version, sm.GetSecretVersionRequest, sm.SecretVersion),
                Method(
                    "ListSecretVersions",
                    self.list_versions,
                    sm.ListSecretVersionsRequest,
                    sm.ListSecretVersionsResponse,
                ),
                Method(
                    "AccessSecretVersion",
                    self.access_version,
                    sm.AccessSecretVersionRequest,
                    sm.AccessSecretVersionResponse,
                ),
                Method(
                    "DisableSecretVersion",
                    self.disable_version,
                    sm.DisableSecretVersionRequest,
                    sm.SecretVersion,
                ),
                Method(
                    "EnableSecretVersion",
                    self.enable_version,
                    sm.EnableSecretVersionRequest,
                    sm.SecretVersion,
                ),
                Method(
                    "DestroySecretVersion",
                    self.destroy_version,
                    sm.DestroySecretVersionRequest,
                    sm.SecretVersion,
                ),
                *iam_policy_methods(self.get_iam_policy, self.set_iam_policy, self.test_iam_permissions),
            ],
            hub,
        )


def _etag_mismatch(name: str) -> ApiError:
    return ApiError(grpc.StatusCode.ABORTED, f"The etag does not match the current etag of [{name}].")


def _state_filter(text: str) -> secretmanager_v1.SecretVersion.State | None:
    if not text:
        return None
    match = re.fullmatch(r"\s*state\s*[:=]\s*([A-Z_]+)\s*", text)
    if not match or match[1] not in State_.__members__:
        raise invalid(f"Unsupported filter {text!r}: the emulator understands only 'state:STATE'.")
    return State_[match[1]]
