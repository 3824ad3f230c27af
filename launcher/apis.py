"""The Google APIs gemma-launch calls, enabled through Service Usage before anything else.

A new project has only Google's default services on
(https://cloud.google.com/service-usage/docs/enabled-service#default); every other call would answer
SERVICE_DISABLED. Enabling is idempotent: what is on is left alone, and a second `up` enables nothing.
An API just enabled may answer SERVICE_DISABLED a while longer: for those, RETRY waits it out (cloud.py).
"""

from __future__ import annotations

import time

from google.cloud import service_usage_v1

from launcher.changes import Change
from launcher.cloud import ENABLED, POLLING, RETRY, Clients
from launcher.cloud_errors import explained
from launcher.settings import Settings

# Each API and why gemma-launch needs it.
REQUIRED: dict[str, str] = {
    "iam.googleapis.com": "service accounts",
    "cloudresourcemanager.googleapis.com": "the build account's log-writing role on the project",
    "storage.googleapis.com": "the bucket",
    "artifactregistry.googleapis.com": "the image repository",
    "secretmanager.googleapis.com": "the Hugging Face token",
    "cloudbuild.googleapis.com": "building the image",
    "run.googleapis.com": "the jobs",
    "logging.googleapis.com": "build and job logs",
    "cloudquotas.googleapis.com": "reading the GPU quota",
    "cloudbilling.googleapis.com": "checking billing (doctor)",
}
# How long a just-enabled API may take to report ENABLED before `up` goes on regardless.
ENABLE_WAIT_S = 120.0
_POLL_S = 1.0


def _states(clients: Clients, settings: Settings) -> dict[str, bool]:
    parent = f"projects/{settings.project_id}"
    response = clients.service_usage.batch_get_services(
        request=service_usage_v1.BatchGetServicesRequest(
            parent=parent, names=[f"{parent}/services/{api}" for api in REQUIRED]
        ),
        retry=RETRY,
    )
    return {
        service.config.name or service.name.rsplit("/", 1)[-1]: service.state
        == service_usage_v1.State.ENABLED
        for service in response.services
    }


def disabled(clients: Clients, settings: Settings) -> list[str]:
    """The required APIs that are off, in REQUIRED's order (one BatchGetServices; changes nothing)."""
    enabled = _states(clients, settings)
    return [api for api in REQUIRED if not enabled.get(api)]


def ensure_apis(clients: Clients, settings: Settings, *, dry_run: bool = False) -> list[Change]:
    """One Change per required API: unchanged, enabled, or would enable."""
    with explained("API", "serviceusage.googleapis.com", settings):
        missing = disabled(clients, settings)
        command = f"gcloud services enable {' '.join(missing)} --project={settings.project_id}"
        if missing and not dry_run:
            clients.service_usage.batch_enable_services(
                request=service_usage_v1.BatchEnableServicesRequest(
                    parent=f"projects/{settings.project_id}", service_ids=missing
                ),
                retry=RETRY,
            ).result(timeout=ENABLE_WAIT_S, retry=RETRY, polling=POLLING)
            _wait_until_enabled(clients, settings, missing)
            ENABLED.mark(missing)
    changes = []
    for api in REQUIRED:
        if api not in missing:
            changes.append(Change("API", api, "unchanged"))
        else:
            # One gcloud command enables them all: list it with the first.
            shown = command if api == missing[0] else ""
            changes.append(Change("API", api, "would enable" if dry_run else "enabled", shown))
    return changes


def _wait_until_enabled(clients: Clients, settings: Settings, apis: list[str]) -> None:
    deadline = time.monotonic() + ENABLE_WAIT_S
    while time.monotonic() < deadline:
        states = _states(clients, settings)
        if all(states.get(api) for api in apis):
            return
        time.sleep(_POLL_S)
