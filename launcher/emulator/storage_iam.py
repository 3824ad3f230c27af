"""Cloud Storage's access checks: the caller, the API, and IAM on the project and the bucket.

Cloud Storage answers in its JSON API's own error format, not gRPC's
(https://cloud.google.com/storage/docs/json_api/v1/status-codes):
- no valid credentials: 401 "Invalid Credentials";
- the API disabled: 403 reason accessNotConfigured, with Google's SERVICE_DISABLED ErrorInfo;
- a missing permission: 403 reason forbidden, "X does not have P access to the Google Cloud Storage
  bucket/object. Permission 'P' denied on resource (or it may not exist).", which the Python client
  raises as google.api_core.exceptions.Forbidden (not PermissionDenied);
- a setIamPolicy naming a service account IAM does not know (yet): 400 "Service account X does not
  exist."; one carrying a stale etag: 412 conditionNotMet
  (https://cloud.google.com/storage/docs/json_api/v1/buckets/setIamPolicy);
- IAM Conditions: a conditional binding needs policy version 3 (google/iam/v1/policy.proto) and a bucket
  with uniform bucket-level access (https://cloud.google.com/storage/docs/access-control/iam#conditions),
  else 400; a getIamPolicy of a policy with conditions without optionsRequestedPolicyVersion=3 fails,
  400 (https://cloud.google.com/storage/docs/json_api/v1/buckets/getIamPolicy).
The permission each method checks is in https://cloud.google.com/storage/docs/access-control/iam-json.
"""

from __future__ import annotations

import base64
import uuid
from http import HTTPStatus
from typing import Any

from gcp_storage_emulator.storage import Storage

from launcher.emulator.access import STORAGE_API, Access
from launcher.emulator.rpc import ApiError

# JSON API method -> (permission, what it is checked on: "bucket", "object" or "project").
PERMISSIONS: dict[str, tuple[str, str]] = {
    "buckets.list": ("storage.buckets.list", "project"),
    "buckets.insert": ("storage.buckets.create", "project"),
    "buckets.get": ("storage.buckets.get", "bucket"),
    "buckets.delete": ("storage.buckets.delete", "bucket"),
    "buckets.patch": ("storage.buckets.update", "bucket"),
    "buckets.getIamPolicy": ("storage.buckets.getIamPolicy", "bucket"),
    "buckets.setIamPolicy": ("storage.buckets.setIamPolicy", "bucket"),
    "bucketAccessControls.list": ("storage.buckets.get", "bucket"),
    "defaultObjectAccessControls.list": ("storage.buckets.get", "bucket"),
    "objects.list": ("storage.objects.list", "bucket"),
    "objects.get": ("storage.objects.get", "object"),
    "objects.insert": ("storage.objects.create", "object"),
    "objects.delete": ("storage.objects.delete", "object"),
    "objects.patch": ("storage.objects.update", "object"),
    "objects.copy": ("storage.objects.create", "object"),
    "objects.rewrite": ("storage.objects.create", "object"),
    "objects.compose": ("storage.objects.create", "object"),
    "objects.restore": ("storage.objects.restore", "object"),
}


class Denied(Exception):
    def __init__(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        super().__init__(body["error"]["message"])
        self.status = status
        self.body = body


def _body(code: HTTPStatus, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """Cloud Storage's error body; `extra` may carry the gRPC-style `status` that some errors add."""
    return {
        "error": {
            "code": code.value,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
            **extra,
        }
    }


def bucket_project(access: Access, storage: Storage, bucket: str) -> str | None:
    stored = storage.buckets.get(bucket)
    return access.project_id(str(stored["projectNumber"])) if stored else None


def check(access: Access, storage: Storage, method: str, request: Any) -> str:
    """The caller's member when `request` may go ahead; else raises Denied with Google's answer."""
    try:
        member = access.caller(request.get_header("Authorization"))
    except ApiError:
        raise Denied(
            HTTPStatus.UNAUTHORIZED, _body(HTTPStatus.UNAUTHORIZED, "authError", "Invalid Credentials")
        ) from None
    if method not in PERMISSIONS:
        return member
    permission, scope = PERMISSIONS[method]
    bucket = request.params.get("bucket_name") or ""
    if scope == "project":
        project = (request.query.get("project") or [""])[0]
    else:
        project = bucket_project(access, storage, bucket)
    if not project:
        return member  # no such bucket: the handler answers 404
    try:
        access.require_enabled(project, *STORAGE_API)
    except ApiError as error:
        info = error.details[0]
        detail = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": info.reason}
        detail |= {"domain": info.domain, "metadata": dict(info.metadata)}
        body = _body(HTTPStatus.FORBIDDEN, "accessNotConfigured", error.message, status="PERMISSION_DENIED")
        body["error"]["details"] = [detail]
        raise Denied(HTTPStatus.FORBIDDEN, body) from None
    resource = f"projects/_/buckets/{bucket}" if bucket else f"projects/{project}"
    if access.allowed(member, permission, project, resource):
        return member
    who = member.split(":", 1)[-1]
    kind = "object" if scope == "object" else "bucket" if scope == "bucket" else "project"
    message = (
        f"{who} does not have {permission} access to the Google Cloud Storage {kind}. Permission "
        f"'{permission}' denied on resource (or it may not exist)."
    )
    raise Denied(HTTPStatus.FORBIDDEN, _body(HTTPStatus.FORBIDDEN, "forbidden", message))


def bucket_policies(storage: Storage, name: str) -> list[dict[str, Any]]:
    """The bucket's own policy, for access.py (name: projects/_/buckets/B)."""
    policy = storage.get_bucket_iam_policy(name.rsplit("/", 1)[-1])
    return [policy] if policy else []


def set_iam_policy(access: Access, storage: Storage, bucket: str, body: dict[str, Any]) -> dict[str, Any]:
    """The policy to store for a setIamPolicy `body`, or Denied with GCS's 400 / 412."""
    current = storage.get_bucket_iam_policy(bucket) or {}
    if body.get("etag") and current.get("etag") and body["etag"] != current["etag"]:
        raise Denied(
            HTTPStatus.PRECONDITION_FAILED,
            _body(
                HTTPStatus.PRECONDITION_FAILED,
                "conditionNotMet",
                "At least one of the pre-conditions you specified did not hold.",
            ),
        )
    bindings = body.get("bindings") or []
    if any(binding.get("condition") for binding in bindings):
        if body.get("version") != 3:
            raise _invalid("IAM policies with conditions must be version 3: set the policy's version to 3.")
        uniform = storage.buckets[bucket].get("iamConfiguration", {}).get("uniformBucketLevelAccess", {})
        if not uniform.get("enabled"):
            raise _invalid(
                "IAM Conditions can only be used on buckets with uniform bucket-level access enabled."
            )
    for binding in bindings:
        for member in binding.get("members") or []:
            if unknown := access.unknown_member(member):
                raise Denied(HTTPStatus.BAD_REQUEST, _body(HTTPStatus.BAD_REQUEST, "invalid", unknown))
    return {
        "kind": "storage#policy",
        "resourceId": f"projects/_/buckets/{bucket}",
        "version": body.get("version", 1),
        "etag": base64.b64encode(uuid.uuid4().bytes[:8]).decode(),
        "bindings": body.get("bindings") or [],
    }


def readable_policy(storage: Storage, bucket: str, requested_version: str) -> None:
    """Denied (400) when the bucket's policy has conditions and the reader did not ask for version 3."""
    policy = storage.get_bucket_iam_policy(bucket) or {}
    if requested_version != "3" and any(b.get("condition") for b in policy.get("bindings") or []):
        raise _invalid(
            "The bucket's IAM policy contains conditions: request it with optionsRequestedPolicyVersion=3."
        )


def _invalid(message: str) -> Denied:
    return Denied(HTTPStatus.BAD_REQUEST, _body(HTTPStatus.BAD_REQUEST, "invalid", message))


def granted(access: Access, storage: Storage, member: str, bucket: str, permissions: list[str]) -> list[str]:
    project = bucket_project(access, storage, bucket)
    if project is None:
        return []
    resource = f"projects/_/buckets/{bucket}"
    return [p for p in permissions if access.allowed(member, p, project, resource)]
