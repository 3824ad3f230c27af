"""Idempotent provisioning: each ensure_* reads first, changes only what differs, and says what it did.

Two service accounts, each granted only what it needs, scoped as narrowly as Google allows:
- the job's: storage.objectUser on its one bucket (the object access a gcsfuse mount needs),
  secretAccessor on its one secret;
- the build's: storage.objectViewer on the bucket (the source archive), artifactregistry.writer on the
  one repository, and logging.logWriter on the project, the narrowest scope that role has. New
  projects run builds as the Compute Engine default account, which organisations created after May
  2024 leave without roles (https://cloud.google.com/build/docs/cloud-build-service-account-updates).
A create that races another `up`, or whose reply was lost, meets ALREADY_EXISTS on retry and is then
treated as done, since the resource is the one asked for. The resources are made here, the bindings in
launcher/iam_bindings.py; `provision` runs both in order.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from contextlib import suppress

from google.api_core import exceptions
from google.cloud import artifactregistry_v1, iam_admin_v1, secretmanager_v1, storage

from launcher import iam_bindings
from launcher.apis import ensure_apis
from launcher.changes import Change
from launcher.cloud import GRANTED, POLLING, RETRY, Clients
from launcher.cloud_errors import explained
from launcher.errors import UserError
from launcher.iam_bindings import (
    ensure_bucket_iam,
    ensure_build_log_writer,
    ensure_build_source_access,
    ensure_repository_access,
    ensure_secret_access,
)
from launcher.settings import Settings


def _ensure_account(
    clients: Clients, settings: Settings, account_id: str, purpose: str, *, dry_run: bool
) -> Change:
    email = f"{account_id}@{settings.project_id}.iam.gserviceaccount.com"
    display = f"gemma-launch {purpose}"
    command = (
        f"gcloud iam service-accounts create {account_id} --project={settings.project_id} "
        f'--display-name="{display}"'
    )
    with explained("service account", email, settings):
        try:
            clients.iam.get_service_account(
                name=f"projects/{settings.project_id}/serviceAccounts/{email}", retry=RETRY
            )
            return Change("service account", email, "unchanged")
        except exceptions.NotFound:
            pass
        if dry_run:
            return Change("service account", email, "would create", command)
        with suppress(exceptions.AlreadyExists):
            clients.iam.create_service_account(
                request=iam_admin_v1.CreateServiceAccountRequest(
                    name=f"projects/{settings.project_id}",
                    account_id=account_id,
                    service_account=iam_admin_v1.ServiceAccount(
                        display_name=display,
                        description=f"Runs the Gemma 3 {purpose} (created by gemma-launch).",
                    ),
                ),
                retry=RETRY,
            )
        return Change("service account", email, "created", command)


def ensure_service_account(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    return _ensure_account(clients, settings, settings.service_account, "fine-tuning job", dry_run=dry_run)


def ensure_build_account(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    return _ensure_account(clients, settings, settings.build_service_account, "image build", dry_run=dry_run)


# What "would update" / "updated" change; neither token is ever shown, only that they differ.
_UNIFORM_ACCESS_ON = ("iamConfiguration.uniformBucketLevelAccess.enabled: false -> true",)
_NEW_TOKEN_VERSION = ("latest version: the token it holds -> the one in $HF_TOKEN",)


def ensure_bucket(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    name = settings.bucket
    command = (
        f"gcloud storage buckets create gs://{name} --project={settings.project_id} "
        f"--location={settings.region} --uniform-bucket-level-access"
    )
    with explained("bucket", name, settings):
        bucket = _lookup_bucket(clients, name)
        if bucket is None:
            if dry_run:
                return Change("bucket", name, "would create", command)
            bucket = clients.storage.bucket(name)
            bucket.iam_configuration.uniform_bucket_level_access_enabled = True
            try:
                clients.storage.create_bucket(bucket, location=settings.region, retry=RETRY)
                return Change("bucket", name, "created", command)
            except exceptions.Conflict:
                bucket = _lookup_bucket(clients, name)
                if bucket is None:
                    raise _taken(name) from None
        if (bucket.location or "").lower() != settings.region:
            raise UserError(
                f"Bucket {name} exists in {bucket.location}, but the job runs in {settings.region}.",
                "Cloud Run mounts only buckets of the job's region: choose another bucket with --bucket, "
                f"or set --region {bucket.location.lower()}.",
            )
        if not bucket.iam_configuration.uniform_bucket_level_access_enabled:
            if dry_run:
                return Change(
                    "bucket",
                    name,
                    "would update",
                    f"gcloud storage buckets update gs://{name} --uniform-bucket-level-access",
                    _UNIFORM_ACCESS_ON,
                )
            bucket.iam_configuration.uniform_bucket_level_access_enabled = True
            bucket.patch(retry=RETRY)
            return Change("bucket", name, "updated", diff=_UNIFORM_ACCESS_ON)
        return Change("bucket", name, "unchanged")


def _lookup_bucket(clients: Clients, name: str) -> storage.Bucket | None:
    """The bucket, None when the name is free; a UserError when another project holds it.

    Bucket names are global, and a bucket of another project answers 403, not 404, to whoever lacks
    storage.buckets.get on it (https://cloud.google.com/storage/docs/buckets#naming).
    """
    try:
        return clients.storage.lookup_bucket(name, retry=RETRY)
    except exceptions.Forbidden:
        raise _taken(name) from None


def _taken(name: str) -> UserError:
    return UserError(
        f"Bucket name {name} is taken by another project (or by one your account cannot read).",
        "Bucket names are global: choose another with --bucket or $BUCKET_NAME.",
    )


def ensure_repository(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    name = settings.repository_name
    command = (
        f"gcloud artifacts repositories create {settings.repository} --repository-format=docker "
        f"--location={settings.region} --project={settings.project_id}"
    )
    with explained("repository", name, settings):
        try:
            found = clients.registry.get_repository(name=name, retry=RETRY)
            _check_repository(found, settings)
            return Change("repository", name, "unchanged")
        except exceptions.NotFound:
            pass
        if dry_run:
            return Change("repository", name, "would create", command)
        with suppress(exceptions.AlreadyExists):
            clients.registry.create_repository(
                request=artifactregistry_v1.CreateRepositoryRequest(
                    parent=settings.location,
                    repository_id=settings.repository,
                    repository=artifactregistry_v1.Repository(
                        format_=artifactregistry_v1.Repository.Format.DOCKER,
                        description="Gemma 3 fine-tuning images (gemma-launch)",
                    ),
                ),
                retry=RETRY,
            ).result(timeout=300, retry=RETRY, polling=POLLING)
        return Change("repository", name, "created", command)


def _check_repository(repository: artifactregistry_v1.Repository, settings: Settings) -> None:
    """An existing repository that every build could not push to is refused before anything is built.

    Each build tags its image `latest` too (cloudbuild.yaml), moving the tag from the previous build's
    image, which a repository with immutable tags forbids: "prevents all tags from being modified, moved
    or deleted" (the proto comment of DockerRepositoryConfig.immutable_tags).
    """
    where = f"Artifact Registry repository {settings.repository} in {settings.region}"
    if repository.format_ != artifactregistry_v1.Repository.Format.DOCKER:
        raise UserError(
            f"The {where} holds {repository.format_.name} packages, not Docker images.",
            "Choose another repository with --repository (or $AR_REPO); `up` creates it.",
        )
    if repository.docker_config.immutable_tags:
        raise UserError(
            f"The {where} has immutable tags, and each build of gemma-launch moves the tag `latest` to "
            "its new image: the second build's push would fail.",
            "Choose another repository with --repository (or $AR_REPO), which `up` creates, or turn "
            f"immutable tags off: gcloud artifacts repositories update {settings.repository} "
            f"--location={settings.region} --project={settings.project_id} --no-immutable-tags",
        )


def ensure_secret(clients: Clients, settings: Settings, *, dry_run: bool = False) -> Change:
    """The secret exists and its latest version holds the token; a new version only when it differs."""
    name = settings.secret_name
    command = (
        f'printf %s "$HF_TOKEN" | gcloud secrets create {settings.secret_id} --data-file=- '
        f"--replication-policy=automatic --project={settings.project_id}"
    )
    with explained("secret", name, settings):
        created = False
        try:
            clients.secrets.get_secret(name=name, retry=RETRY)
        except exceptions.NotFound:
            settings.require_hf_token()
            if dry_run:
                return Change("secret", name, "would create", command)
            with suppress(exceptions.AlreadyExists):
                clients.secrets.create_secret(
                    request=secretmanager_v1.CreateSecretRequest(
                        parent=f"projects/{settings.project_id}",
                        secret_id=settings.secret_id,
                        secret=secretmanager_v1.Secret(
                            replication=secretmanager_v1.Replication(
                                automatic=secretmanager_v1.Replication.Automatic()
                            ),
                            labels={"managed-by": "gemma-launch"},
                        ),
                    ),
                    retry=RETRY,
                )
            created = True
        latest = _latest_payload(clients, name)
        if settings.hf_token is None:
            if latest is None:
                settings.require_hf_token()
            return Change("secret", name, "created" if created else "unchanged")
        token = settings.hf_token.get_secret_value().encode()
        if latest is not None and hmac.compare_digest(latest, token):
            return Change("secret", name, "created" if created else "unchanged")
        if dry_run:
            return Change(
                "secret",
                name,
                "would update",
                f'printf %s "$HF_TOKEN" | gcloud secrets versions add {settings.secret_id} --data-file=-',
                _NEW_TOKEN_VERSION,
            )

        def add() -> None:
            # Retried as a whole, not per call: when a reply was lost the version exists, and a blind
            # retry would add a second copy of the token.
            before = _latest_version(clients, name)
            if before is not None and hmac.compare_digest(before.payload.data, token):
                return
            added = clients.secrets.add_secret_version(
                request=secretmanager_v1.AddSecretVersionRequest(
                    parent=name, payload=secretmanager_v1.SecretPayload(data=token)
                ),
                retry=None,
            )
            _destroy_raced_copies(clients, name, before, added.name, token)

        RETRY(add)()
        if created or latest is None:
            return Change("secret", name, "created", command)
        return Change("secret", name, "updated", command, _NEW_TOKEN_VERSION)


def _version_number(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


def _latest_version(clients: Clients, secret: str) -> secretmanager_v1.AccessSecretVersionResponse | None:
    try:
        return clients.secrets.access_secret_version(name=f"{secret}/versions/latest", retry=RETRY)
    except (exceptions.NotFound, exceptions.FailedPrecondition):
        return None


def _destroy_raced_copies(
    clients: Clients,
    secret: str,
    before: secretmanager_v1.AccessSecretVersionResponse | None,
    added: str,
    token: bytes,
) -> None:
    """Another `up` may have added the same token between our check and our add. The versions in
    between that hold it are destroyed, keeping ours, the newest, which is what `latest` resolves to."""
    first = _version_number(before.name) + 1 if before is not None else 1
    for number in range(first, _version_number(added)):
        version = f"{secret}/versions/{number}"
        try:
            payload = clients.secrets.access_secret_version(name=version, retry=RETRY).payload.data
        except (exceptions.NotFound, exceptions.FailedPrecondition):
            continue
        if hmac.compare_digest(payload, token):
            with suppress(exceptions.FailedPrecondition, exceptions.NotFound):
                clients.secrets.destroy_secret_version(name=version, retry=RETRY)


def _latest_payload(clients: Clients, secret: str) -> bytes | None:
    try:
        return clients.secrets.access_secret_version(
            name=f"{secret}/versions/latest", retry=RETRY
        ).payload.data
    except (exceptions.NotFound, exceptions.FailedPrecondition):
        return None


def apis_pending(changes: list[Change]) -> bool:
    """True when a dry run found APIs to enable, so the steps after them were not planned."""
    return any(change.kind == "API" and change.status == "would enable" for change in changes)


PROVISION_STEPS: tuple[Callable[..., Change], ...] = (
    ensure_service_account,
    ensure_build_account,
    ensure_bucket,
    ensure_bucket_iam,
    ensure_build_source_access,
    ensure_repository,
    ensure_repository_access,
    ensure_build_log_writer,
    ensure_secret,
    ensure_secret_access,
)


def provision(
    clients: Clients,
    settings: Settings,
    *,
    dry_run: bool = False,
    on_change: Callable[[Change], None] = lambda change: None,
    after_apis: Callable[[], None] = lambda: None,
) -> list[Change]:
    """Enable the APIs, call `after_apis` (up's checks that needed them), then run every step in order;
    stop at the first failure (a re-run picks up from there). A dry run on a project whose APIs are
    still off stops after listing them: nothing behind a disabled API can be read, so the rest cannot be
    planned honestly."""
    changes = ensure_apis(clients, settings, dry_run=dry_run)
    for change in changes:
        on_change(change)
    if apis_pending(changes):
        return changes
    after_apis()
    if settings.hf_token is None:
        # Checked before anything is created: a first `up` without a token would otherwise stop at the
        # secret, after making the service account, bucket and repository.
        with explained("secret", settings.secret_name, settings):
            if iam_bindings.missing_secret(clients, settings):
                settings.require_hf_token()
    for step in PROVISION_STEPS:
        change = step(clients, settings, dry_run=dry_run)
        changes.append(change)
        on_change(change)
        if change.kind.endswith(" IAM") and change.status in ("created", "updated"):
            # Not in effect for a few minutes: what uses these accounts next waits for it (cloud.py).
            GRANTED.mark([settings.service_account_email, settings.build_service_account_email])
    return changes
