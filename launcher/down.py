"""Teardown: remove what `up` made, each resource reported as deleted, absent or kept.

Order: the training and staging jobs (their executions go with them), then every binding `up` granted,
each taken out of its resource's policy by the same read-modify-write with the etag that added it, then
the repository (its images go with it), the secret (its versions go with it), the two service accounts;
the bucket, which holds the weights, data and results, only when asked. Nothing is deleted while an
execution runs, unless `force`, which cancels it first.

A step whose API is not enabled (a project where `up` never ran) cannot see its resource: it is reported
"not checked", naming the API, and `down` goes on, so a fresh project is torn down without an error.

Every step reads first, so a second `down` deletes nothing. A delete whose reply was lost is retried,
meets NotFound and is reported deleted, since the resource was there when we read it; a step that fails
stops `down` before its line is printed, so nothing half-deleted is reported as done, and running it
again picks up from there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import suppress
from typing import Any

from google.api_core import exceptions
from google.iam.v1 import iam_policy_pb2, options_pb2, policy_pb2

from launcher import executions, iam_bindings
from launcher import job as jobs
from launcher.changes import Change
from launcher.cloud import POLLING, RETRY, Clients
from launcher.cloud_errors import disabled_api, explained
from launcher.errors import UserError
from launcher.settings import Settings


def _done(dry_run: bool) -> str:
    return "would delete" if dry_run else "deleted"


NOT_CHECKED = "not checked"


def _unless_api_off(kind: str, name: str, step: Callable[[], Change]) -> Change:
    """The step's change, or "not checked" when its API is off: Google answers SERVICE_DISABLED for every
    read then, whether the resource exists or not (https://cloud.google.com/apis/design/errors#error_info)."""
    try:
        return step()
    except UserError as error:
        cause = error.__cause__
        api = disabled_api(cause) if isinstance(cause, exceptions.GoogleAPICallError) else None
        if not api:
            raise
        return Change(
            kind,
            name,
            NOT_CHECKED,
            diff=(f"{api} is not enabled: cannot tell whether it exists",),
            detail={"api": api},
        )


def _delete(
    kind: str,
    name: str,
    settings: Settings,
    exists: Callable[[], bool],
    delete: Callable[[], Any],
    command: str,
    *,
    dry_run: bool,
) -> Change:
    """Read, then delete; NotFound from the delete means a retried call whose first reply was lost
    (or another `down`) already removed it."""

    def step() -> Change:
        with explained(kind, name, settings):
            if not exists():
                return Change(kind, name, "absent")
            if dry_run:
                return Change(kind, name, "would delete", command)
            with suppress(exceptions.NotFound):
                delete()
        return Change(kind, name, "deleted", command)

    return _unless_api_off(kind, name, step)


def _found(read: Callable[[], Any]) -> Callable[[], bool]:
    def exists() -> bool:
        try:
            read()
            return True
        except exceptions.NotFound:
            return False

    return exists


# ---- executions ---------------------------------------------------------------------------------


def _job_settings(settings: Settings) -> list[tuple[str, Settings]]:
    return [("job", settings), ("staging job", jobs.stage_settings(settings))]


def _unfinished(clients: Clients, settings: Settings) -> list[tuple[Settings, str]]:
    found = []
    for _, job_settings in _job_settings(settings):
        try:
            there = _found(lambda s=job_settings: clients.jobs.get_job(name=s.job_name, retry=RETRY))()
        except exceptions.PermissionDenied as error:
            if disabled_api(error):  # nothing of Cloud Run can be seen: its job's line says so
                return []
            raise
        if there:
            found += [(job_settings, e.name) for e in executions.running(clients, job_settings)]
    return found


def stop_executions(clients: Clients, settings: Settings, *, force: bool, dry_run: bool) -> list[Change]:
    """A UserError while an execution of either job runs, unless `force`: then each is cancelled.

    Cloud Run refuses to delete a job whose executions have not finished (FAILED_PRECONDITION)."""
    unfinished = _unfinished(clients, settings)
    if unfinished and not force:
        job_settings, name = unfinished[0]
        short = executions.short_name(name)
        raise UserError(
            f"Execution {short} of job {job_settings.job} is still running: `down` deletes nothing "
            "while one runs.",
            f"Wait for it (`gemma-launch logs {short} --follow`), stop it with `gemma-launch cancel "
            f"{short}`, or pass --force to cancel it and tear down.",
        )
    changes = []
    for job_settings, name in unfinished:
        short = executions.short_name(name)
        if dry_run:
            changes.append(
                Change("execution", short, "would cancel", f"gcloud run jobs executions cancel {short}")
            )
            continue
        outcome = executions.cancel(clients, job_settings, name)
        if outcome.status == "cancelling":
            raise UserError(
                f"Execution {short} of job {job_settings.job} is still stopping after its cancel.",
                "Run `gemma-launch down` again in a minute: the job can be deleted once it has stopped.",
            )
        changes.append(Change("execution", short, "cancelled"))
    return changes


def delete_job(clients: Clients, settings: Settings, kind: str, *, dry_run: bool) -> Change:
    name = settings.job_name
    return _delete(
        kind,
        name,
        settings,
        _found(lambda: clients.jobs.get_job(name=name, retry=RETRY)),
        lambda: clients.jobs.delete_job(name=name, retry=RETRY).result(
            timeout=300, retry=RETRY, polling=POLLING
        ),
        f"gcloud run jobs delete {settings.job} --region={settings.region} --project={settings.project_id}",
        dry_run=dry_run,
    )


# ---- bindings -----------------------------------------------------------------------------------


def _revoke(read: Callable[[], Any], write: Callable[[Any], None], matches: Callable[[Any], bool]) -> bool:
    """Take a member out of a policy, re-reading when a concurrent change moved its etag; True when it
    was there. `matches(policy)` takes the member out of the policy read, True if it held it."""
    removed = False

    def revoke() -> bool:
        nonlocal removed
        policy = read()
        if not matches(policy):
            return removed  # taken out by an earlier try whose reply was lost, or was never there
        removed = True
        write(policy)
        return True

    return iam_bindings._POLICY_RACE_RETRY(revoke)()


def _grpc_binding(
    client: Any,
    kind: str,
    resource: str,
    role: str,
    member: str,
    command: str,
    settings: Settings,
    *,
    dry_run: bool,
) -> Change:
    label = (
        f"{role} on {resource.rsplit('/', 1)[-1]}"
        if kind != "project IAM"
        else f"{role} on project {settings.project_id}"
    )

    def read() -> policy_pb2.Policy:
        # Version 3: see iam_bindings._ensure_policy_binding.
        return client.get_iam_policy(
            request=iam_policy_pb2.GetIamPolicyRequest(
                resource=resource, options=options_pb2.GetPolicyOptions(requested_policy_version=3)
            ),
            retry=RETRY,
        )

    def matches(policy: policy_pb2.Policy) -> bool:
        held = False
        kept = []
        for binding in policy.bindings:
            # Only the unconditional binding `up` made is ours to remove.
            if binding.role == role and member in binding.members and not binding.HasField("condition"):
                held = True
                binding.members.remove(member)
            if binding.members:
                copy = policy_pb2.Binding()
                copy.CopyFrom(binding)
                kept.append(copy)
        # An empty binding is dropped, as the IAM API itself does with one left without members.
        del policy.bindings[:]
        policy.bindings.extend(kept)
        return held

    def write(policy: policy_pb2.Policy) -> None:
        client.set_iam_policy(
            request=iam_policy_pb2.SetIamPolicyRequest(resource=resource, policy=policy), retry=RETRY
        )

    def step() -> Change:
        with explained(kind, label, settings):
            try:
                if dry_run:
                    return Change(kind, label, "would delete" if matches(read()) else "absent", command)
                removed = _revoke(read, write, matches)
            except exceptions.NotFound:  # the resource itself is gone, and its policy with it
                return Change(kind, label, "absent")
        return Change(kind, label, "deleted", command) if removed else Change(kind, label, "absent")

    return _unless_api_off(kind, label, step)


def _bucket_binding(
    clients: Clients, settings: Settings, email: str, role: str, *, dry_run: bool, also: str = ""
) -> Change:
    """Remove the member from `role` on the bucket, and from `also` (what up granted in its place before)."""
    member = f"serviceAccount:{email}"
    label = f"{role} on gs://{settings.bucket}"
    command = (
        f"gcloud storage buckets remove-iam-policy-binding gs://{settings.bucket} --member={member} "
        f"--role={role}"
    )
    bucket = clients.storage.bucket(settings.bucket)

    def matches(policy: Any) -> bool:
        held = iam_bindings.bucket_grants(policy, member, role, also)
        for binding in policy.bindings:
            if binding["role"] in (role, also):
                binding["members"].discard(member)
        policy.bindings = [b for b in policy.bindings if b["members"]]
        return held

    def step() -> Change:
        with explained("bucket IAM", label, settings):
            if clients.storage.lookup_bucket(settings.bucket, retry=RETRY) is None:
                return Change("bucket IAM", label, "absent")
            read = lambda: bucket.get_iam_policy(requested_policy_version=3, retry=RETRY)  # noqa: E731
            if dry_run:
                return Change("bucket IAM", label, "would delete" if matches(read()) else "absent", command)
            removed = _revoke(read, lambda policy: bucket.set_iam_policy(policy, retry=RETRY), matches)
        return (
            Change("bucket IAM", label, "deleted", command)
            if removed
            else Change("bucket IAM", label, "absent")
        )

    return _unless_api_off("bucket IAM", label, step)


def remove_bindings(clients: Clients, settings: Settings, *, dry_run: bool) -> Iterator[Change]:
    """Every binding provision.py grants, and only those: other members of the same roles stay."""
    job, build = settings.service_account_email, settings.build_service_account_email
    project = f"projects/{settings.project_id}"
    where = f"--project={settings.project_id}"
    yield _bucket_binding(
        clients, settings, job, iam_bindings.OBJECT_USER, dry_run=dry_run, also=iam_bindings.OBJECT_ADMIN
    )
    yield _bucket_binding(clients, settings, build, iam_bindings.OBJECT_VIEWER, dry_run=dry_run)
    yield _grpc_binding(
        clients.registry,
        "repository IAM",
        settings.repository_name,
        iam_bindings.REGISTRY_WRITER,
        f"serviceAccount:{build}",
        f"gcloud artifacts repositories remove-iam-policy-binding {settings.repository} "
        f"--location={settings.region} {where} --member=serviceAccount:{build} "
        f"--role={iam_bindings.REGISTRY_WRITER}",
        settings,
        dry_run=dry_run,
    )
    yield _grpc_binding(
        clients.projects,
        "project IAM",
        project,
        iam_bindings.LOG_WRITER,
        f"serviceAccount:{build}",
        f"gcloud projects remove-iam-policy-binding {settings.project_id} --member=serviceAccount:{build} "
        f"--role={iam_bindings.LOG_WRITER}",
        settings,
        dry_run=dry_run,
    )
    yield _grpc_binding(
        clients.secrets,
        "secret IAM",
        settings.secret_name,
        iam_bindings.SECRET_ACCESSOR,
        f"serviceAccount:{job}",
        f"gcloud secrets remove-iam-policy-binding {settings.secret_id} {where} "
        f"--member=serviceAccount:{job} --role={iam_bindings.SECRET_ACCESSOR}",
        settings,
        dry_run=dry_run,
    )


# ---- resources ----------------------------------------------------------------------------------


def delete_repository(clients: Clients, settings: Settings, *, dry_run: bool) -> Change:
    name = settings.repository_name
    return _delete(
        "repository",
        name,
        settings,
        _found(lambda: clients.registry.get_repository(name=name, retry=RETRY)),
        # A long-running operation: done once the repository and every image in it are gone.
        lambda: clients.registry.delete_repository(name=name, retry=RETRY).result(
            timeout=300, retry=RETRY, polling=POLLING
        ),
        f"gcloud artifacts repositories delete {settings.repository} --location={settings.region} "
        f"--project={settings.project_id}",
        dry_run=dry_run,
    )


def delete_secret(clients: Clients, settings: Settings, *, dry_run: bool) -> Change:
    name = settings.secret_name
    return _delete(
        "secret",
        name,
        settings,
        _found(lambda: clients.secrets.get_secret(name=name, retry=RETRY)),
        lambda: clients.secrets.delete_secret(name=name, retry=RETRY),
        f"gcloud secrets delete {settings.secret_id} --project={settings.project_id}",
        dry_run=dry_run,
    )


def delete_account(clients: Clients, settings: Settings, email: str, *, dry_run: bool) -> Change:
    name = f"projects/{settings.project_id}/serviceAccounts/{email}"
    return _delete(
        "service account",
        email,
        settings,
        _found(lambda: clients.iam.get_service_account(name=name, retry=RETRY)),
        lambda: clients.iam.delete_service_account(name=name, retry=RETRY),
        f"gcloud iam service-accounts delete {email} --project={settings.project_id}",
        dry_run=dry_run,
    )


def delete_bucket(clients: Clients, settings: Settings, *, dry_run: bool) -> Change:
    """Every object, then the bucket: Cloud Storage refuses to delete a bucket that holds any (409). Named
    gs://B, as keep_bucket names it."""
    name = settings.bucket

    def delete() -> None:
        for blob in clients.storage.list_blobs(name, retry=RETRY):
            with suppress(exceptions.NotFound):
                blob.delete(retry=RETRY)
        clients.storage.bucket(name).delete(retry=RETRY)

    return _delete(
        "bucket",
        f"gs://{name}",
        settings,
        lambda: clients.storage.lookup_bucket(name, retry=RETRY) is not None,
        delete,
        f"gcloud storage rm --recursive gs://{name}",
        dry_run=dry_run,
    )


def keep_bucket(clients: Clients, settings: Settings) -> Change:
    """The bucket left in place: kept when it is there, absent when it is not (an earlier `down
    --delete-bucket`, or deleted by hand), as every other step reports what it did not find."""
    name = f"gs://{settings.bucket}"

    def step() -> Change:
        with explained("bucket", name, settings):
            there = clients.storage.lookup_bucket(settings.bucket, retry=RETRY) is not None
        return Change("bucket", name, "kept" if there else "absent")

    return _unless_api_off("bucket", name, step)


def down(
    clients: Clients,
    settings: Settings,
    *,
    delete_bucket_too: bool = False,
    force: bool = False,
    dry_run: bool = False,
    on_change: Callable[[Change], None] = lambda change: None,
) -> list[Change]:
    """Tear down in order, calling `on_change` as each step is done; stop at the first failure."""
    changes: list[Change] = []

    def step(change: Change) -> None:
        changes.append(change)
        on_change(change)

    for change in stop_executions(clients, settings, force=force, dry_run=dry_run):
        step(change)
    for kind, job_settings in _job_settings(settings):
        step(delete_job(clients, job_settings, kind, dry_run=dry_run))
    for change in remove_bindings(clients, settings, dry_run=dry_run):
        step(change)
    step(delete_repository(clients, settings, dry_run=dry_run))
    step(delete_secret(clients, settings, dry_run=dry_run))
    for email in (settings.service_account_email, settings.build_service_account_email):
        step(delete_account(clients, settings, email, dry_run=dry_run))
    if delete_bucket_too:
        step(delete_bucket(clients, settings, dry_run=dry_run))
    else:
        step(keep_bucket(clients, settings))
    return changes
