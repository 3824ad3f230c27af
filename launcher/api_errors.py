"""Google API errors -> a UserError that names the resource, the cause and what to do about it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from google.api_core import exceptions

from launcher.cloud import retry_deadline_s
from launcher.errors import UserError
from launcher.settings import Settings

# For each kind of resource: the role the caller needs to manage it, and the APIs it lives behind.
_KINDS: dict[str, tuple[str, str]] = {
    "service account": ("roles/iam.serviceAccountAdmin", "iam.googleapis.com"),
    "bucket": ("roles/storage.admin", "storage.googleapis.com"),
    "bucket IAM": ("roles/storage.admin", "storage.googleapis.com"),
    "repository": ("roles/artifactregistry.admin", "artifactregistry.googleapis.com"),
    "secret": ("roles/secretmanager.admin", "secretmanager.googleapis.com"),
    "secret IAM": ("roles/secretmanager.admin", "secretmanager.googleapis.com"),
    "source archive": ("roles/storage.objectAdmin", "storage.googleapis.com"),
    "image": ("roles/artifactregistry.reader", "artifactregistry.googleapis.com"),
    "build": ("roles/cloudbuild.builds.editor", "cloudbuild.googleapis.com logging.googleapis.com"),
}


@contextmanager
def explained(kind: str, name: str, settings: Settings) -> Iterator[None]:
    role, apis = _KINDS[kind]
    try:
        yield
    except exceptions.PermissionDenied as error:
        if "has not been used" in str(error) or "is disabled" in str(error):
            raise UserError(
                f"The API for the {kind} {name} is not enabled: {error.message}",
                f"gcloud services enable {apis} --project={settings.project_id}",
            ) from error
        raise UserError(
            f"Permission denied on {kind} {name}: {error.message}",
            f"Your account needs {role} on project {settings.project_id}: gcloud projects "
            f"add-iam-policy-binding {settings.project_id} --member=user:YOU --role={role}",
        ) from error
    except exceptions.Unauthenticated as error:
        raise UserError(
            f"Not authenticated while working on {kind} {name}.",
            "Run `gcloud auth application-default login`.",
        ) from error
    except exceptions.RetryError as error:
        raise UserError(
            f"Gave up on {kind} {name} after retrying transient errors for {retry_deadline_s():g} s: "
            f"{error.cause}",
            "The service is unavailable right now; run the same command again later: it picks up where "
            "it stopped.",
        ) from error
    except exceptions.GoogleAPICallError as error:
        raise UserError(
            f"{kind.capitalize()} {name} failed: {error.message or error}",
            "Fix the cause and run the command again: what is already done is not redone.",
        ) from error
