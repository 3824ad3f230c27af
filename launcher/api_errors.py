"""Google API errors -> one UserError (Error line + Hint line) that says what to do, for every command.

The causes a fresh project meets first, each recognised the way Google reports it:
- an API not enabled: PERMISSION_DENIED (gRPC) or 403 (Cloud Storage) whose ErrorInfo reason is
  SERVICE_DISABLED (https://cloud.google.com/apis/design/errors#error_info);
- a missing permission: gRPC PERMISSION_DENIED or Cloud Storage's 403, which the storage client raises
  as `Forbidden`, not `PermissionDenied`; both name the permission ("Permission 'x.y.z' denied"), and
  the hint names the smallest predefined role that holds it;
- no or expired credentials: UNAUTHENTICATED / 401;
- paid APIs in a project without billing: FAILED_PRECONDITION, reason UREQ_PROJECT_BILLING_NOT_FOUND;
- transient errors retried until the deadline (RetryError).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from google.api_core import exceptions

from launcher.cloud import retry_deadline_s
from launcher.errors import UserError
from launcher.iam_roles import smallest_role_with
from launcher.settings import Settings

_PERMISSION = re.compile(
    r"Permission '(?P<permission>[\w.]+)' denied|does not have (?P<storage>[\w.]+) access"
)
_DENIED_ACCOUNT = re.compile(r"(?P<email>[\w.-]+@[\w.-]+\.gserviceaccount\.com) does not have")
_API_URL = re.compile(r"/apis/api/(?P<api>[\w.-]+)/")
_LOGIN = "Run `gcloud auth application-default login`, then run the command again."


def disabled_api(error: exceptions.GoogleAPICallError) -> str | None:
    """The API a SERVICE_DISABLED error names, else None."""
    if getattr(error, "reason", None) == "SERVICE_DISABLED":
        return (getattr(error, "metadata", None) or {}).get("service") or _api_in(str(error))
    if isinstance(error, exceptions.PermissionDenied | exceptions.Forbidden) and "has not been used" in str(
        error
    ):
        return _api_in(str(error))
    return None


def _api_in(text: str) -> str | None:
    match = _API_URL.search(text)
    return match["api"] if match else None


def denied_permission(error: exceptions.GoogleAPICallError) -> str | None:
    metadata = getattr(error, "metadata", None) or {}
    if metadata.get("permission"):
        return metadata["permission"]
    match = _PERMISSION.search(str(error))
    return (match["permission"] or match["storage"]) if match else None


def translate(error: BaseException, settings: Settings | None, what: str = "") -> UserError:
    """The UserError for a Google API error raised while working on `what` (e.g. "bucket b")."""
    project = settings.project_id if settings else "PROJECT_ID"
    on = f" on {what}" if what else ""
    if isinstance(error, exceptions.RetryError):
        return UserError(
            f"Gave up{on} after retrying transient errors for {retry_deadline_s():g} s: {error.cause}",
            "The service is unavailable right now; run the same command again later: it picks up where "
            "it stopped.",
        )
    if not isinstance(error, exceptions.GoogleAPICallError):
        raise TypeError(f"not a Google API error: {error!r}")
    message = error.message or str(error)
    if api := disabled_api(error):
        return UserError(
            f"The {api} API is not enabled in project {project}{on}.",
            f"Run `gemma-launch up`, which enables every API it needs, or: gcloud services enable {api} "
            f"--project={project} (it may take a minute to take effect).",
        )
    if (
        getattr(error, "reason", None) == "UREQ_PROJECT_BILLING_NOT_FOUND"
        or "Billing must be enabled" in message
    ):
        return UserError(
            f"Billing is not enabled on project {project}, so Google will not enable its paid APIs{on}: "
            f"{message}",
            "Link a billing account: "
            f"https://console.cloud.google.com/billing/linkedaccount?project={project} (or gcloud billing "
            f"projects link {project} --billing-account=ACCOUNT_ID), then run the command again.",
        )
    if isinstance(error, exceptions.PermissionDenied | exceptions.Forbidden):
        permission = denied_permission(error)
        role = smallest_role_with(permission, on_project=True) if permission else None
        needed = f"a role with {permission}, e.g. {role}" if role else f"{permission or 'this permission'}"
        account = _DENIED_ACCOUNT.search(message)
        member = f"serviceAccount:{account['email']}" if account else "user:YOUR_EMAIL"
        return UserError(
            f"Permission denied{on}: {message}",
            f"The account needs {needed}. A project owner can grant it: gcloud projects "
            f"add-iam-policy-binding {project} --member={member} --role={role or 'ROLE'}; "
            "`gemma-launch doctor` lists every permission `up` needs.",
        )
    if isinstance(error, exceptions.Unauthenticated):
        return UserError(f"Not authenticated{on}: {message}", _LOGIN)
    subject = f"{what[0].upper()}{what[1:]}" if what else "The request"
    return UserError(
        f"{subject} failed: {message}",
        "Fix the cause and run the command again: what is already done is not redone.",
    )


@contextmanager
def explained(kind: str, name: str, settings: Settings) -> Iterator[None]:
    """Google API errors inside the block become UserErrors naming `kind` `name`."""
    try:
        yield
    except (exceptions.GoogleAPICallError, exceptions.RetryError) as error:
        raise translate(error, settings, f"{kind} {name}") from error
