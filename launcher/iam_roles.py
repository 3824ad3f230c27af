"""Google's predefined IAM roles and their permissions: what the emulator checks, and what hints suggest.

Each role lists the permissions of the real role that an emulated method checks (the real roles hold
more, for APIs the emulator does not serve). Sources, per family, in the IAM roles and permissions
index https://cloud.google.com/iam/docs/roles-permissions :
- Cloud Storage: /iam/docs/roles-permissions/storage and /storage/docs/access-control/iam-roles
  (`roles/storage.objectAdmin` holds `storage.objects.*` and no `storage.buckets.get`);
- Secret Manager: /iam/docs/roles-permissions/secretmanager;
- Artifact Registry: /iam/docs/roles-permissions/artifactregistry;
- Cloud Logging: /iam/docs/roles-permissions/logging;
- IAM: /iam/docs/roles-permissions/iam (`iam.serviceAccounts.actAs` is in serviceAccountUser);
- Cloud Run: /iam/docs/roles-permissions/run and /run/docs/reference/iam/roles;
- Cloud Build: /iam/docs/roles-permissions/cloudbuild;
- Service Usage, Resource Manager, Cloud Billing, Cloud Quotas: their pages in the same index.
The basic roles are derived: owner holds every permission below, editor all but the IAM policy
setters and secret access, viewer the get and list permissions (/iam/docs/roles-overview#basic).
"""

from __future__ import annotations

_STORAGE_OBJECTS = {
    "storage.objects.create",
    "storage.objects.delete",
    "storage.objects.get",
    "storage.objects.list",
    "storage.objects.update",
    "storage.objects.getIamPolicy",
    "storage.objects.setIamPolicy",
    "storage.objects.restore",
}
_STORAGE_BUCKETS = {
    "storage.buckets.create",
    "storage.buckets.delete",
    "storage.buckets.get",
    "storage.buckets.list",
    "storage.buckets.update",
    "storage.buckets.getIamPolicy",
    "storage.buckets.setIamPolicy",
}
_SECRET_VERSIONS_READ = {"secretmanager.versions.get", "secretmanager.versions.list"}
_SECRETS_READ = {"secretmanager.secrets.get", "secretmanager.secrets.list"}
_REGISTRY_READ = {
    "artifactregistry.repositories.get",
    "artifactregistry.repositories.list",
    "artifactregistry.repositories.downloadArtifacts",
    "artifactregistry.dockerimages.get",
    "artifactregistry.dockerimages.list",
}
_REGISTRY_WRITE = _REGISTRY_READ | {"artifactregistry.repositories.uploadArtifacts"}
_RUN_READ = {
    "run.jobs.get",
    "run.jobs.list",
    "run.executions.get",
    "run.executions.list",
    "run.tasks.get",
    "run.tasks.list",
    "run.operations.get",
}
_RUN_DEVELOPER = _RUN_READ | {
    "run.jobs.create",
    "run.jobs.update",
    "run.jobs.delete",
    "run.jobs.run",
    "run.jobs.runWithOverrides",
    "run.executions.cancel",
    "run.executions.delete",
}
_BUILDS = {
    "cloudbuild.builds.create",
    "cloudbuild.builds.get",
    "cloudbuild.builds.list",
    "cloudbuild.builds.update",
}
_SERVICE_ACCOUNTS_READ = {"iam.serviceAccounts.get", "iam.serviceAccounts.list"}

PREDEFINED: dict[str, frozenset[str]] = {
    name: frozenset(permissions)
    for name, permissions in {
        "roles/storage.admin": _STORAGE_BUCKETS | _STORAGE_OBJECTS,
        "roles/storage.objectAdmin": _STORAGE_OBJECTS,
        "roles/storage.objectUser": _STORAGE_OBJECTS
        - {"storage.objects.getIamPolicy", "storage.objects.setIamPolicy"},
        "roles/storage.objectViewer": {"storage.objects.get", "storage.objects.list"},
        "roles/storage.objectCreator": {"storage.objects.create"},
        "roles/storage.legacyBucketOwner": {
            "storage.buckets.get",
            "storage.buckets.update",
            "storage.buckets.getIamPolicy",
            "storage.buckets.setIamPolicy",
            "storage.objects.list",
            "storage.objects.create",
            "storage.objects.delete",
        },
        "roles/storage.legacyBucketWriter": {
            "storage.buckets.get",
            "storage.objects.list",
            "storage.objects.create",
            "storage.objects.delete",
        },
        "roles/storage.legacyBucketReader": {"storage.buckets.get", "storage.objects.list"},
        "roles/storage.legacyObjectReader": {"storage.objects.get"},
        "roles/secretmanager.admin": _SECRETS_READ
        | _SECRET_VERSIONS_READ
        | {
            "secretmanager.secrets.create",
            "secretmanager.secrets.delete",
            "secretmanager.secrets.update",
            "secretmanager.secrets.getIamPolicy",
            "secretmanager.secrets.setIamPolicy",
            "secretmanager.versions.add",
            "secretmanager.versions.access",
            "secretmanager.versions.destroy",
            "secretmanager.versions.disable",
            "secretmanager.versions.enable",
        },
        "roles/secretmanager.secretAccessor": {"secretmanager.versions.access"},
        "roles/secretmanager.secretVersionAdder": {"secretmanager.versions.add"},
        "roles/secretmanager.viewer": _SECRETS_READ
        | _SECRET_VERSIONS_READ
        | {"secretmanager.secrets.getIamPolicy"},
        "roles/artifactregistry.admin": _REGISTRY_WRITE
        | {
            "artifactregistry.repositories.create",
            "artifactregistry.repositories.delete",
            "artifactregistry.repositories.update",
            "artifactregistry.repositories.getIamPolicy",
            "artifactregistry.repositories.setIamPolicy",
        },
        "roles/artifactregistry.writer": _REGISTRY_WRITE,
        "roles/artifactregistry.reader": _REGISTRY_READ,
        "roles/logging.logWriter": {"logging.logEntries.create"},
        "roles/logging.viewer": {"logging.logEntries.list", "logging.logs.list"},
        "roles/iam.serviceAccountAdmin": _SERVICE_ACCOUNTS_READ
        | {
            "iam.serviceAccounts.create",
            "iam.serviceAccounts.delete",
            "iam.serviceAccounts.disable",
            "iam.serviceAccounts.enable",
            "iam.serviceAccounts.update",
            "iam.serviceAccounts.getIamPolicy",
            "iam.serviceAccounts.setIamPolicy",
        },
        "roles/iam.serviceAccountUser": _SERVICE_ACCOUNTS_READ | {"iam.serviceAccounts.actAs"},
        "roles/run.admin": _RUN_DEVELOPER | {"run.jobs.getIamPolicy", "run.jobs.setIamPolicy"},
        "roles/run.developer": _RUN_DEVELOPER | {"run.jobs.getIamPolicy"},
        "roles/run.viewer": _RUN_READ | {"run.jobs.getIamPolicy"},
        "roles/run.invoker": {"run.jobs.run"},
        "roles/run.jobsExecutorWithOverrides": _RUN_READ | {"run.jobs.run", "run.jobs.runWithOverrides"},
        "roles/cloudbuild.builds.editor": _BUILDS,
        "roles/cloudbuild.builds.viewer": {"cloudbuild.builds.get", "cloudbuild.builds.list"},
        "roles/serviceusage.serviceUsageAdmin": {
            "serviceusage.services.enable",
            "serviceusage.services.disable",
            "serviceusage.services.get",
            "serviceusage.services.list",
            "serviceusage.services.use",
        },
        "roles/serviceusage.serviceUsageConsumer": {
            "serviceusage.services.get",
            "serviceusage.services.list",
            "serviceusage.services.use",
        },
        "roles/serviceusage.serviceUsageViewer": {"serviceusage.services.get", "serviceusage.services.list"},
        "roles/resourcemanager.projectIamAdmin": {
            "resourcemanager.projects.get",
            "resourcemanager.projects.getIamPolicy",
            "resourcemanager.projects.setIamPolicy",
        },
        "roles/browser": {"resourcemanager.projects.get"},
        "roles/billing.projectManager": {"resourcemanager.projects.createBillingAssignment"},
        "roles/cloudquotas.viewer": {"cloudquotas.quotas.get"},
    }.items()
}

_EVERYTHING = frozenset().union(*PREDEFINED.values()) | {
    "resourcemanager.projects.get",
    "resourcemanager.projects.getIamPolicy",
    "resourcemanager.projects.setIamPolicy",
}
# The basic roles hold (nearly) every permission of every service in the project.
BASIC: dict[str, frozenset[str]] = {
    "roles/owner": _EVERYTHING,
    "roles/editor": frozenset(
        permission
        for permission in _EVERYTHING
        if not permission.endswith(".setIamPolicy") and permission != "secretmanager.versions.access"
    ),
    "roles/viewer": frozenset(
        permission for permission in _EVERYTHING if permission.rsplit(".", 1)[1] in ("get", "list")
    ),
}
ROLES: dict[str, frozenset[str]] = {**PREDEFINED, **BASIC}


def permissions_of(role: str) -> frozenset[str]:
    return ROLES.get(role, frozenset())


# Cloud Storage's legacy roles "can only be applied to a bucket, not a project"
# (https://cloud.google.com/storage/docs/access-control/iam-roles#legacy-roles).
_BUCKET_ONLY = "roles/storage.legacy"


def smallest_role_with(permission: str, *, on_project: bool = False) -> str | None:
    """The predefined role with the fewest permissions that grants `permission`: what a hint suggests.

    `on_project`: only roles that can be granted on a project (`gcloud projects add-iam-policy-binding`).
    """
    holders = [
        name
        for name, permissions in PREDEFINED.items()
        if permission in permissions and not (on_project and name.startswith(_BUCKET_ONLY))
    ]
    return min(holders, key=lambda name: (len(PREDEFINED[name]), name), default=None)
