"""doctor's checks, one function each (what each calls: launcher/doctor.py's docstring), and the
permissions `up` uses (UP_PERMISSIONS). Each returns a Check; what one learns that a later one needs
goes in Found. Nothing here changes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import google.auth.exceptions
import google.auth.transport.requests
from google.api_core import exceptions
from google.iam.v1 import iam_policy_pb2

from launcher import apis, gpus, quota
from launcher import job as jobs
from launcher.cloud import RETRY, Clients
from launcher.cloud_errors import disabled_api
from launcher.errors import UserError
from launcher.iam_roles import smallest_role_with
from launcher.settings import Settings
from launcher.settings_rules import RESTRICTED_BUILD_REGIONS

OK = "ok"
FAILED = "failed"
UNCHECKED = "unchecked"

# What `up` calls, as the permissions Google checks for each call (each method's reference page;
# launcher/emulator/access.py lists the same per method). Tested on the project, where a grant of
# any of them applies to every resource `up` makes in it.
UP_PERMISSIONS: tuple[str, ...] = (
    # the APIs (apis.ensure_apis)
    "serviceusage.services.get",
    "serviceusage.services.enable",
    # the two service accounts, and attaching them to the build and the job
    "iam.serviceAccounts.get",
    "iam.serviceAccounts.create",
    "iam.serviceAccounts.actAs",
    # the bucket, its policy, the build's source archive and the staged files
    "storage.buckets.get",
    "storage.buckets.create",
    "storage.buckets.update",
    "storage.buckets.getIamPolicy",
    "storage.buckets.setIamPolicy",
    "storage.objects.get",
    "storage.objects.list",
    "storage.objects.create",
    "storage.objects.update",
    "storage.objects.delete",
    # the image repository, its policy, and finding an image already built
    "artifactregistry.repositories.get",
    "artifactregistry.repositories.create",
    "artifactregistry.repositories.getIamPolicy",
    "artifactregistry.repositories.setIamPolicy",
    "artifactregistry.dockerimages.get",
    "artifactregistry.dockerimages.list",
    # the build account's log-writing role on the project
    "resourcemanager.projects.getIamPolicy",
    "resourcemanager.projects.setIamPolicy",
    # the HF_TOKEN secret: a new version only when the token changed, and its accessor binding
    "secretmanager.secrets.get",
    "secretmanager.secrets.create",
    "secretmanager.secrets.getIamPolicy",
    "secretmanager.secrets.setIamPolicy",
    "secretmanager.versions.access",
    "secretmanager.versions.add",
    "secretmanager.versions.destroy",
    # the build, followed through its logs
    "cloudbuild.builds.create",
    "cloudbuild.builds.get",
    "cloudbuild.builds.list",
    "cloudbuild.builds.update",
    "logging.logEntries.list",
    # the staging job and the fine-tuning job
    "run.jobs.get",
    "run.jobs.create",
    "run.jobs.update",
    "run.jobs.run",
    "run.executions.get",
    "run.executions.list",
    # the GPU quota `up` reports
    "cloudquotas.quotas.get",
)


@dataclass(frozen=True)
class Check:
    name: str  # credentials | project | billing | apis | permissions | gpu_region | gpu_quota | ...
    status: str  # ok | failed | unchecked
    detail: str
    fix: str = ""
    # False for what `up` fixes or only warns about: the APIs, the GPU quota, the build location, a
    # bucket of another project that this account may use.
    stops_up: bool = True

    @property
    def passed(self) -> bool:
        return self.status == OK


TITLES = {
    "credentials": "credentials",
    "project": "project",
    "billing": "billing",
    "apis": "APIs",
    "permissions": "permissions",
    "gpu_region": "GPU region",
    "gpu_quota": "GPU quota",
    "build_location": "build location",
    "bucket": "bucket",
    "service_accounts": "service accounts",
}


@dataclass
class Found:
    """What one check learns that a later one needs."""

    member: str = ""  # the caller as an IAM member, when known
    project_number: str = ""
    disabled: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


Step = Callable[[Clients, Settings, Found], Check]


def _enable_fix(api: str, settings: Settings) -> str:
    return (
        f"`gemma-launch up` enables it first, or: gcloud services enable {api} "
        f"--project={settings.project_id}; then run `gemma-launch doctor` again."
    )


def unchecked(name: str, api: str, settings: Settings) -> Check:
    return Check(
        name, UNCHECKED, f"Cannot check until the {api} API is enabled.", _enable_fix(api, settings), False
    )


def check_credentials(clients: Clients, settings: Settings, found: Found) -> Check:
    if clients.emulator:
        # The emulator takes a request without credentials as its project owner, the CLI user, who is
        # DEFAULT_USER in every emulator `gemma-launch emulator start` runs.
        from launcher.emulator.access import DEFAULT_USER

        found.member = f"user:{DEFAULT_USER}"
        return Check("credentials", OK, f"{DEFAULT_USER} (the emulator's caller, at {clients.emulator})")
    try:
        credentials = clients.credentials
        credentials.refresh(google.auth.transport.requests.Request())
    except UserError as error:
        return Check("credentials", FAILED, error.message, error.hint)
    except google.auth.exceptions.GoogleAuthError as error:
        return Check(
            "credentials",
            FAILED,
            f"Application Default Credentials could not get an access token: {error}",
            "Run `gcloud auth application-default login`, then run `gemma-launch doctor` again.",
        )
    # Service accounts (keys, the metadata server, impersonation) expose their email, user credentials
    # only when their file names the account.
    email = getattr(credentials, "service_account_email", None) or getattr(credentials, "account", None)
    kind = f"{type(credentials).__module__}.{type(credentials).__qualname__}"
    if not email or email == "default":
        return Check("credentials", OK, f"Application Default Credentials ({kind}); the account is not named")
    found.member = f"serviceAccount:{email}" if email.endswith("gserviceaccount.com") else f"user:{email}"
    return Check("credentials", OK, f"{email} (Application Default Credentials, {kind})")


def check_project(clients: Clients, settings: Settings, found: Found) -> Check:
    try:
        project = clients.projects.get_project(name=f"projects/{settings.project_id}", retry=RETRY)
    except (exceptions.PermissionDenied, exceptions.NotFound) as error:
        if disabled_api(error):
            raise
        return Check(
            "project",
            FAILED,
            f"Project {settings.project_id} does not exist, or this account may not see it.",
            "Check --project / $PROJECT_ID (`gcloud projects list` shows yours), or ask an owner of it for "
            f"a role on it: gcloud projects add-iam-policy-binding {settings.project_id} "
            f"--member={found.member or 'user:YOUR_EMAIL'} --role=roles/browser",
        )
    found.project_number = project.name.rsplit("/", 1)[-1]
    if project.state != project.State.ACTIVE:
        return Check(
            "project",
            FAILED,
            f"Project {settings.project_id} is {project.state.name}, not ACTIVE.",
            f"Restore it (gcloud projects undelete {settings.project_id}) or choose another with --project.",
        )
    return Check("project", OK, f"{project.project_id} (number {found.project_number}), active")


def check_billing(clients: Clients, settings: Settings, found: Found) -> Check:
    info = clients.billing.get_project_billing_info(name=f"projects/{settings.project_id}", retry=RETRY)
    if info.billing_enabled:
        return Check("billing", OK, f"enabled ({info.billing_account_name})")
    return Check(
        "billing",
        FAILED,
        f"Billing is not enabled for project {settings.project_id}: Cloud Run, Cloud Build and Artifact "
        "Registry refuse to work without it.",
        "Link a billing account: https://console.cloud.google.com/billing/linkedaccount?project="
        f"{settings.project_id} or gcloud billing projects link {settings.project_id} "
        "--billing-account=ACCOUNT_ID",
    )


def check_apis(clients: Clients, settings: Settings, found: Found) -> Check:
    found.disabled = apis.disabled(clients, settings)
    if not found.disabled:
        return Check("apis", OK, f"all {len(apis.REQUIRED)} enabled", stops_up=False)
    return Check(
        "apis",
        FAILED,
        f"{len(found.disabled)} of {len(apis.REQUIRED)} disabled: {', '.join(found.disabled)}.",
        f"`gemma-launch up` enables them first, or: gcloud services enable {' '.join(found.disabled)} "
        f"--project={settings.project_id}",
        stops_up=False,
    )


def check_permissions(clients: Clients, settings: Settings, found: Found) -> Check:
    response = clients.projects.test_iam_permissions(
        request=iam_policy_pb2.TestIamPermissionsRequest(
            resource=f"projects/{settings.project_id}", permissions=list(UP_PERMISSIONS)
        ),
        retry=RETRY,
    )
    granted = set(response.permissions)
    found.missing = [permission for permission in UP_PERMISSIONS if permission not in granted]
    if not found.missing:
        return Check("permissions", OK, f"all {len(UP_PERMISSIONS)} that `up` uses")
    roles = {permission: smallest_role_with(permission, on_project=True) for permission in found.missing}
    named = ", ".join(
        f"{permission} ({roles[permission] or 'no predefined role'})" for permission in found.missing
    )
    to_grant = sorted({role for role in roles.values() if role})
    member = found.member or "user:YOUR_EMAIL"
    return Check(
        "permissions",
        FAILED,
        f"Missing {len(found.missing)} of the {len(UP_PERMISSIONS)} permissions `up` uses: {named}.",
        f"A project owner can grant {', '.join(to_grant)}: gcloud projects add-iam-policy-binding "
        f"{settings.project_id} --member={member} --role=ROLE, once per role (or roles/owner for all).",
    )


def check_gpu_region(clients: Clients, settings: Settings, found: Found) -> Check:
    problem = settings.gpu_not_offered()
    if problem:
        return Check("gpu_region", FAILED, problem.message, problem.hint)
    if not settings.uses_gpu:
        return Check("gpu_region", OK, "no GPU (--gpu none): any Cloud Run region will do")
    if not gpus.serves(settings.gpu):  # `up` refuses it before any request: say so here too
        try:
            gpus.check(settings.gpu, settings.model_id)
        except UserError as refused:
            return Check("gpu_region", FAILED, refused.message, refused.hint)
    return Check("gpu_region", OK, f"{settings.gpu} is offered in {settings.region}")


def check_gpu_quota(clients: Clients, settings: Settings, found: Found) -> Check:
    if not settings.uses_gpu:
        return Check("gpu_quota", OK, "no GPU (--gpu none): no quota needed", stops_up=False)
    if "cloudquotas.googleapis.com" in found.disabled:
        return unchecked("gpu_quota", "cloudquotas.googleapis.com", settings)
    try:
        gpu_quota = quota.read(clients, settings)
    except quota.QuotaUnknown as error:
        return Check(
            "gpu_quota",
            FAILED,
            f"Unreadable: {error}.",
            f"See it at {quota.CONSOLE_QUOTAS}?project={settings.project_id}; reading it needs "
            "cloudquotas.quotas.get (roles/cloudquotas.viewer).",
            False,
        )
    assert gpu_quota is not None  # None only for a job without a GPU
    if gpu_quota.gpus < 1:
        return Check(
            "gpu_quota",
            FAILED,
            f"No Cloud Run GPU quota yet ({gpu_quota.describe()}): `gemma-launch run` is refused until it "
            "is granted.",
            f"Request {gpu_quota.quota_id} for region {settings.region} at {gpu_quota.request_url}; "
            "meanwhile `--gpu none` runs the same job on CPU only.",
            False,
        )
    return Check("gpu_quota", OK, gpu_quota.describe(), stops_up=False)


def check_build_location(clients: Clients, settings: Settings, found: Found) -> Check:
    location = settings.build_location
    if location == "global":
        return Check("build_location", OK, "global: every project may build there", stops_up=False)
    if location in RESTRICTED_BUILD_REGIONS:
        return Check("build_location", OK, f"{location}: every project may build there", stops_up=False)
    return Check(
        "build_location",
        FAILED,
        f"Cloud Build may refuse builds in {location}: some projects, new ones among them, may only build "
        f"in global or {', '.join(RESTRICTED_BUILD_REGIONS)} "
        "(https://cloud.google.com/build/docs/locations#restricted_regions_for_some_projects).",
        f'Use --build-location global (or build_location = "global" in gemma-launch.toml); the image '
        f"still goes to the repository in {settings.region}.",
        False,
    )


def check_bucket(clients: Clients, settings: Settings, found: Found) -> Check:
    name = settings.bucket
    try:
        bucket = clients.storage.lookup_bucket(name, retry=RETRY)
    except exceptions.Forbidden as error:
        if disabled_api(error):
            raise
        ours_denied = (
            " (or this account lacks storage.buckets.get: see permissions)"
            if "storage.buckets.get" in found.missing
            else ""
        )
        return Check(
            "bucket",
            FAILED,
            f"Bucket name {name} is taken: the bucket exists and this account may not read it, so it "
            f"belongs to another project{ours_denied}.",
            "Bucket names are global: choose another with --bucket or $BUCKET_NAME.",
        )
    if bucket is None:
        return Check("bucket", OK, f"gs://{name} is free: `up` creates it in {settings.region}")
    if (bucket.location or "").lower() != settings.region:
        return Check(
            "bucket",
            FAILED,
            f"Bucket {name} exists in {bucket.location}, but the job runs in {settings.region}.",
            "Cloud Run mounts only buckets of the job's region: choose another bucket with --bucket, "
            f"or set --region {(bucket.location or '').lower()}.",
        )
    if not found.project_number:
        return Check(
            "bucket",
            UNCHECKED,
            f"gs://{name} exists; whether it is project {settings.project_id}'s needs the "
            "cloudresourcemanager.googleapis.com API.",
            _enable_fix("cloudresourcemanager.googleapis.com", settings),
            False,
        )
    if str(bucket.project_number) != found.project_number:
        # Usable (this account may read it), but it is another project's, whose owners and billing rule it.
        return Check(
            "bucket",
            FAILED,
            f"gs://{name} belongs to another project (number {bucket.project_number}), not to "
            f"{settings.project_id}.",
            "Choose another with --bucket or $BUCKET_NAME, or keep it: `up` uses it as it is.",
            False,
        )
    return Check("bucket", OK, f"gs://{name} exists in this project, in {settings.region}")


def check_service_accounts(clients: Clients, settings: Settings, found: Found) -> Check:
    """After `up`, the job's and the build's accounts must still exist and be enabled: one deleted by hand
    stops `run` (and `up` makes it again); one disabled stops `run` and `up`, which leaves it disabled."""
    if {"iam.googleapis.com", "run.googleapis.com"} & set(found.disabled):
        return Check("service_accounts", OK, "`up` creates them once it has enabled the APIs", stops_up=False)
    uses = {
        settings.service_account_email: "the job's tasks could not start",
        settings.build_service_account_email: "image builds would fail",
    }
    missing, disabled = [], []
    for email in uses:
        try:
            account = clients.iam.get_service_account(
                name=f"projects/{settings.project_id}/serviceAccounts/{email}", retry=RETRY
            )
        except exceptions.NotFound:
            missing.append(email)
            continue
        if account.disabled:
            disabled.append(email)
    if disabled:
        return Check(
            "service_accounts",
            FAILED,
            "; ".join(f"{email} is disabled, so {uses[email]}" for email in disabled)
            + ": `run` and `up` are refused.",
            jobs.enable_hint(disabled, settings.project_id) + ".",
        )
    if not missing:
        return Check("service_accounts", OK, f"{' and '.join(uses)} exist", stops_up=False)
    try:
        clients.jobs.get_job(name=settings.job_name, retry=RETRY)
    except exceptions.NotFound:
        return Check("service_accounts", OK, f"`up` creates {' and '.join(missing)}", stops_up=False)
    return Check(
        "service_accounts",
        FAILED,
        f"{' and '.join(missing)} no longer exist{'s' if len(missing) == 1 else ''}, but job {settings.job} "
        "does: deleted after `up`, so `run` is refused.",
        "Run `gemma-launch up`: it creates the accounts again and grants their roles.",
        stops_up=False,
    )
