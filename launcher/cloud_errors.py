"""Google API, Cloud Storage and Hugging Face Hub errors -> one UserError (Error line + Hint line) that
says what to do, for every command.

The causes a fresh project meets first, each recognised the way Google reports it:
- an API not enabled: PERMISSION_DENIED (gRPC) or 403 (Cloud Storage) whose ErrorInfo reason is
  SERVICE_DISABLED (https://cloud.google.com/apis/design/errors#error_info);
- a missing permission: gRPC PERMISSION_DENIED or Cloud Storage's 403, which the storage client raises
  as `Forbidden`, not `PermissionDenied`; both name the permission ("Permission 'x.y.z' denied"), and
  the hint names the smallest predefined role that holds it;
- no or expired credentials: UNAUTHENTICATED / 401;
- paid APIs in a project without billing: FAILED_PRECONDITION, reason UREQ_PROJECT_BILLING_NOT_FOUND;
- transient errors retried until the deadline (RetryError); when they were Cloud Logging's read quota
  (its ErrorInfo's quota_metric, logging.googleapis.com/read_requests), other readers took it all.
Staging adds the bucket's own failures (`storage_errors`) and the Hub's answers (`hub_errors`): a gated
repo, a missing revision or repo, a rejected token.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from google.api_core import exceptions
from google.cloud.storage.exceptions import DataCorruption
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from launcher.cloud import GRANT_PROPAGATION_S, refused_new_grant, retry_deadline_s
from launcher.errors import UserError
from launcher.iam_roles import smallest_role_with
from launcher.settings import Settings

_PERMISSION = re.compile(
    r"Permission '(?P<permission>[\w.]+)' denied|does not have (?P<storage>[\w.]+) access"
)
_DENIED_ACCOUNT = re.compile(r"(?P<email>[\w.-]+@[\w.-]+\.gserviceaccount\.com) does not have")
_ACTED_AS = re.compile(r"on service account (?P<email>[\w.-]+@[\w.-]+)")
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


def _log_read_quota(error: BaseException | None) -> bool:
    metadata = getattr(error, "metadata", None) or {}
    return metadata.get("quota_metric") == "logging.googleapis.com/read_requests"


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
    if isinstance(error, exceptions.RetryError) and _log_read_quota(error.cause):
        return UserError(
            f"Gave up{on} after waiting {retry_deadline_s():g} s for Cloud Logging's read quota (60 log "
            f"reads a minute per project): other readers of project {project}'s logs use all of it.",
            "Close the other readers (a Logs Explorer tab, another `gemma-launch logs --follow`) or wait a "
            "minute, then run the same command again: builds and executions go on meanwhile.",
        )
    if isinstance(error, exceptions.RetryError) and (api := disabled_api(error.cause)):
        # Only an API this process just enabled is retried on SERVICE_DISABLED (cloud.RETRY).
        return UserError(
            f"The {api} API, enabled moments ago, was still not served in project {project}{on} after "
            f"{retry_deadline_s():g} s: Google can take a few minutes to turn an API on.",
            "Wait a few minutes, then run the same command again: what is done stays done.",
        )
    if isinstance(error, exceptions.RetryError) and (account := refused_new_grant(error.cause)):
        # Only a refusal naming an account this process just granted roles to is retried (cloud.RETRY).
        return UserError(
            f"The roles granted to {account} moments ago were still not in effect{on} after "
            f"{retry_deadline_s():g} s: {error.cause}",
            f"Google can take up to {GRANT_PROPAGATION_S / 60:g} minutes to put a new role in effect: wait "
            "a few minutes, then run the same command again: what is done stays done.",
        )
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
        acted_as = _ACTED_AS.search(message)
        if acted_as and (permission or "").lower() == "iam.serviceaccounts.actas":
            # IAM answers alike for a missing grant and a missing account ("(or it may not exist)").
            email = acted_as["email"]
            return UserError(
                f"Permission denied{on}: {message}",
                f"If {email} was deleted, run `gemma-launch up` to create it again with its roles. "
                "Otherwise you need roles/iam.serviceAccountUser on it; a project owner can grant it: "
                f"gcloud iam service-accounts add-iam-policy-binding {email} --member=user:YOUR_EMAIL "
                f"--role=roles/iam.serviceAccountUser --project={project}",
            )
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


@contextmanager
def hub_errors(kind: str, repo_id: str, revision: str | None, page: str, has_token: bool) -> Iterator[None]:
    """Turn the Hub's answers into messages that say what to do."""
    endpoint = constants.ENDPOINT
    what = f"{kind} {repo_id}"
    try:
        yield
    except GatedRepoError as error:
        if has_token:
            raise UserError(
                f"The {what} is gated and the Hugging Face account of HF_TOKEN has not been granted access.",
                f"Open {page} while logged in to that account, accept the licence (access is usually "
                "granted at once), then run this again.",
            ) from error
        raise UserError(
            f"The {what} is gated and no Hugging Face token was given.",
            f"Accept the licence at {page}, then export HF_TOKEN=hf_... (a read token of that account, "
            f"from {endpoint}/settings/tokens) and run this again.",
        ) from error
    except RevisionNotFoundError as error:
        raise UserError(
            f"Revision {revision} of the {what} does not exist.",
            f"Pass --revision with a branch, tag or commit of {page} (or leave it out for main).",
        ) from error
    except RepositoryNotFoundError as error:
        raise UserError(
            f"The {what} was not found on the Hugging Face Hub ({endpoint}).",
            "Check the id (owner/name); for a private repo HF_TOKEN must belong to an account that can "
            "see it.",
        ) from error
    except HFValidationError as error:
        raise UserError(
            f"{repo_id!r} is not a valid Hugging Face {kind} id: {error}", "Use owner/name."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise UserError(
                "The Hugging Face Hub rejected HF_TOKEN (401 Unauthorized): it is not a valid token.",
                f"Create a read token at {endpoint}/settings/tokens and export HF_TOKEN=hf_..., "
                "or run `hf auth login`.",
            ) from error
        if status == 403:
            raise UserError(
                f"The Hugging Face Hub refused access to the {what} (403 Forbidden).",
                "A fine-grained token needs 'Read access to contents of all public gated repos you can "
                f"access'; create one at {endpoint}/settings/tokens.",
            ) from error
        raise UserError(
            f"The Hugging Face Hub answered {status} for the {what}.",
            "It may be a transient problem: run again, staging resumes where it stopped.",
        ) from error
    except httpx2.TransportError as error:
        raise UserError(
            f"Cannot reach the Hugging Face Hub at {endpoint}: {error}.",
            "Check the network (and HF_ENDPOINT if you use a mirror), then run again: staging resumes.",
        ) from error


@contextmanager
def storage_errors(bucket: str) -> Iterator[None]:
    try:
        yield
    except exceptions.NotFound as error:
        raise UserError(
            f"Bucket {bucket} does not exist: {error.message}", "Run `gemma-launch up` to create it."
        ) from error
    except exceptions.Forbidden as error:
        raise translate(error, None, f"bucket {bucket}") from error
    except exceptions.GoogleAPICallError as error:
        raise UserError(
            f"Cloud Storage failed on bucket {bucket}: {error.message or error}",
            "Run again: staging resumes where it stopped.",
        ) from error
    except DataCorruption as error:
        raise UserError(
            f"An upload to bucket {bucket} arrived corrupted (crc32c mismatch); the object was removed.",
            "Run again: staging resumes where it stopped.",
        ) from error
