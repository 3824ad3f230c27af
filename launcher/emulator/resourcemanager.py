"""Resource Manager v3 Projects (get, IAM policy) and Cloud Billing's project billing info.

The project's IAM policy is the one access.py checks every call against; `gcloud projects
add-iam-policy-binding` is a read-modify-write of it with an etag
(https://cloud.google.com/resource-manager/reference/rest/v3/projects/setIamPolicy: a stale etag is
ABORTED, https://cloud.google.com/iam/docs/policies#etag). Billing is enabled unless the emulator was
started without it (https://cloud.google.com/billing/docs/reference/rest/v1/projects/getBillingInfo).
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid

import grpc
from google.cloud import billing_v1, resourcemanager_v3
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import json_format

from launcher.emulator.access import Access
from launcher.emulator.rpc import ApiError, Hub, Method, iam_policy_methods, invalid, service_handler
from launcher.iam_roles import ROLES

_PROJECT = re.compile(r"^projects/(?P<project>[^/]+)$")
_BILLING = re.compile(r"^projects/(?P<project>[^/]+)(?:/billingInfo)?$")
# policy.proto, Binding.members: a deleted principal stays in a policy as deleted:KIND:EMAIL?uid=ID.
_MEMBER = re.compile(
    r"^(?:allUsers|allAuthenticatedUsers|(?:user|serviceAccount|group):[^@\s]+@[^@\s]+|domain:\S+"
    r"|deleted:(?:user|serviceAccount|group):[^@\s]+@[^@\s?]+\?uid=\d+)$"
)


def validate_policy(
    policy: policy_pb2.Policy, access: Access, grantable: re.Pattern[str] | None = None
) -> None:
    """The checks SetIamPolicy makes on any resource: version, known roles, well-formed and known members."""
    if policy.version not in (0, 1, 3):
        raise invalid(f"Invalid policy version {policy.version}: use 1 or 3.")
    check_versioned(policy)
    for binding in policy.bindings:
        if binding.role not in ROLES and not binding.role.startswith(("projects/", "organizations/")):
            raise invalid(f"Role {binding.role} does not exist.")
        if grantable is not None and not grantable.match(binding.role):
            raise invalid(f"Role {binding.role} is not supported for this resource.")
        for member in binding.members:
            if not _MEMBER.match(member):
                raise invalid(f"Invalid member {member!r} in the binding of {binding.role}.")
            if unknown := access.unknown_member(member):
                raise invalid(unknown)


def policy_from(stored: dict) -> policy_pb2.Policy:
    return json_format.ParseDict(stored, policy_pb2.Policy())


# Policy versions (google/iam/v1/policy.proto, Policy.version and GetPolicyOptions): "Any operation
# that affects conditional role bindings must specify version 3", getting the policy included. A
# reader asking for less gets version 1 with each conditional binding's role renamed ROLE_withcond_HASH
# and its condition hidden (https://cloud.google.com/iam/docs/troubleshooting-withcond); writing such a
# policy back, or any version 1 policy over one with conditions, is refused.
VERSION_3_NEEDED = (
    "Policies with conditional role bindings must specify version 3; request and set version 3 "
    "(https://cloud.google.com/iam/docs/policies#versions)."
)


def has_conditions(policy: policy_pb2.Policy) -> bool:
    return any(binding.HasField("condition") for binding in policy.bindings)


def policy_as_requested(
    policy: policy_pb2.Policy, request: iam_policy_pb2.GetIamPolicyRequest
) -> policy_pb2.Policy:
    """GetIamPolicy's answer: `policy` in the format `request.options.requested_policy_version` asks for."""
    requested = request.options.requested_policy_version
    if requested not in (0, 1, 3):
        raise invalid(f"Invalid requested policy version {requested}: use 1 or 3.")
    shown = policy_pb2.Policy()
    shown.CopyFrom(policy)
    if not has_conditions(policy):
        shown.version = min(shown.version, 1)
    elif requested == 3:
        shown.version = 3
    else:
        shown.version = 1
        for binding in shown.bindings:
            if binding.HasField("condition"):
                digest = hashlib.sha256(binding.condition.SerializeToString()).hexdigest()[:20]
                binding.role = f"{binding.role}_withcond_{digest}"
                binding.ClearField("condition")
    return shown


def check_versioned(policy: policy_pb2.Policy) -> None:
    """Conditional bindings only in a version 3 policy, and no ROLE_withcond_HASH read from version 1."""
    for binding in policy.bindings:
        if (binding.HasField("condition") and policy.version != 3) or "_withcond_" in binding.role:
            raise invalid(VERSION_3_NEEDED)


def check_version_kept(current: policy_pb2.Policy, policy: policy_pb2.Policy) -> None:
    """A read-modify-write (etag set) of a policy with conditions must stay version 3; without an etag
    IAM lets a version 1 policy replace it, conditions and all (Policy.version's comment)."""
    if policy.etag and policy.version != 3 and has_conditions(current):
        raise invalid(VERSION_3_NEEDED)


def replaced_policy(current: dict, policy: policy_pb2.Policy, name: str) -> dict:
    """The stored form of `policy` replacing `current`, refused when its etag is stale."""
    if policy.etag and base64.b64encode(policy.etag).decode() != current.get("etag"):
        raise ApiError(
            grpc.StatusCode.ABORTED,
            f"There were concurrent policy changes on {name}. Please retry the whole read-modify-write "
            "with exponential backoff.",
        )
    check_version_kept(policy_from(current), policy)
    updated = policy_pb2.Policy()
    updated.CopyFrom(policy)
    updated.etag = uuid.uuid4().bytes[:8]
    return json_format.MessageToDict(updated)


class Projects:
    def __init__(self, access: Access) -> None:
        self.access = access

    def _project_id(self, name: str) -> str:
        match = _PROJECT.match(name)
        if not match:
            raise invalid(f"Invalid project name {name!r}: projects/PROJECT_ID_OR_NUMBER.")
        return self.access.project_id(match["project"])

    def get(self, request: resourcemanager_v3.GetProjectRequest, context: grpc.ServicerContext):
        project_id = self._project_id(request.name)
        record = self.access.project(project_id)
        return resourcemanager_v3.Project(
            name=f"projects/{record['number']}",
            project_id=project_id,
            display_name=project_id,
            state=resourcemanager_v3.Project.State.ACTIVE,
        )

    def get_iam_policy(self, request: iam_policy_pb2.GetIamPolicyRequest, context: grpc.ServicerContext):
        stored = policy_from(self.access.project(self._project_id(request.resource))["policy"])
        return policy_as_requested(stored, request)

    def set_iam_policy(self, request: iam_policy_pb2.SetIamPolicyRequest, context: grpc.ServicerContext):
        project_id = self._project_id(request.resource)
        validate_policy(request.policy, self.access)
        if not any(binding.role == "roles/owner" and binding.members for binding in request.policy.bindings):
            raise invalid("A project must have at least one owner; the policy removes every roles/owner.")

        def replace(record: dict) -> None:
            before = record["policy"]
            record["policy"] = replaced_policy(before, request.policy, request.resource)
            self.access.policy_replaced(before, record["policy"])

        return policy_from(self.access.update_project(project_id, replace)["policy"])

    def test_iam_permissions(
        self, request: iam_policy_pb2.TestIamPermissionsRequest, context: grpc.ServicerContext
    ):
        """The asked permissions the caller holds on the project. It needs no permission itself, and
        "Permissions with wildcards (such as * or storage.*) are not allowed"
        (https://cloud.google.com/resource-manager/reference/rest/v3/projects/testIamPermissions)."""
        project_id = self._project_id(request.resource)
        wildcards = [permission for permission in request.permissions if "*" in permission]
        if wildcards:
            raise invalid(f"Permissions with wildcards are not allowed: {', '.join(wildcards)}.")
        caller = self.access.caller(dict(context.invocation_metadata()).get("authorization"))
        granted = [p for p in request.permissions if self.access.allowed(caller, p, project_id)]
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=granted)

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.cloud.resourcemanager.v3.Projects",
            [
                Method(
                    "GetProject", self.get, resourcemanager_v3.GetProjectRequest, resourcemanager_v3.Project
                ),
                *iam_policy_methods(self.get_iam_policy, self.set_iam_policy, self.test_iam_permissions),
            ],
            hub,
        )


class Billing:
    def __init__(self, access: Access) -> None:
        self.access = access

    def billing_info(self, request: billing_v1.GetProjectBillingInfoRequest, context: grpc.ServicerContext):
        match = _BILLING.match(request.name)
        if not match:
            raise invalid(f"Invalid name {request.name!r}: projects/PROJECT_ID.")
        project_id = self.access.project_id(match["project"])
        enabled = self.access.project(project_id)["billing_enabled"]
        return billing_v1.ProjectBillingInfo(
            name=f"projects/{project_id}/billingInfo",
            project_id=project_id,
            billing_account_name="billingAccounts/000000-000000-000000" if enabled else "",
            billing_enabled=enabled,
        )

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.cloud.billing.v1.CloudBilling",
            [
                Method(
                    "GetProjectBillingInfo",
                    self.billing_info,
                    billing_v1.GetProjectBillingInfoRequest,
                    billing_v1.ProjectBillingInfo,
                )
            ],
            hub,
        )
