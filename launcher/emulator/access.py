"""Who calls, which APIs are on, and what IAM lets each caller do: the checks every emulated API makes.

Google answers every request in this order, and so does the emulator:
1. Credentials. A request without any is the CLI user's (the emulator's configurable project owner),
   which is what the launcher sends through its insecure channel; a bearer token must be one this
   emulator issued (to a task's service account, through the metadata server), else UNAUTHENTICATED.
2. The API must be enabled in the resource's project, else PERMISSION_DENIED with an ErrorInfo of
   reason SERVICE_DISABLED (https://cloud.google.com/service-usage/docs/reference/rest/v1/services and
   https://cloud.google.com/apis/design/errors#error_info). A new project starts with Google's
   default services only (https://cloud.google.com/service-usage/docs/enabled-service#default).
3. The caller needs the method's permission through a role bound to them in the project's policy or
   in the resource's own (bucket, secret, repository): PERMISSION_DENIED "Permission 'P' denied on
   resource 'R' (or it may not exist)." with reason IAM_PERMISSION_DENIED
   (https://cloud.google.com/iam/docs/overview#policy-hierarchy).

An API enabled a moment ago is not yet served: for `api_propagation_s` seconds after Service Usage
enabled it (and reports it ENABLED), its calls still answer SERVICE_DISABLED, whose message says as
much: "If you enabled this API recently, wait a few minutes for the action to propagate to our systems
and retry" (https://cloud.google.com/apis/design/errors#error_info shows the error).

A service account made a moment ago is not yet known to other services' IAM: for `propagation_s`
seconds a policy naming it is refused (https://cloud.google.com/iam/docs/service-accounts-create:
"...it can take up to 60 seconds..."; https://cloud.google.com/iam/docs/troubleshooting-access).

A role granted a moment ago is not yet in effect: for `grant_propagation_s` seconds after a
setIamPolicy added a binding (a role for a member, on a project or on a bucket, secret or repository),
checks of that member's permissions ignore it, as Google's do: "Changes to allow or deny policies
typically propagate in 2 minutes, but could potentially take 7 minutes or longer"
(https://cloud.google.com/iam/docs/access-change-propagation). A binding removed stops granting at once
(Google may honour it a while longer; nothing here relies on either). Pending grants are kept in
memory: a restarted emulator has them all in effect.

A disabled service account keeps its grants, but its tokens are refused until it is enabled again
(iam.py says what IAM documents); what would run as it (a Cloud Run task, a build) fails as it starts.
Attaching it (actAs on CreateJob, UpdateJob, CreateBuild) is not refused: the account exists, and IAM
documents no refusal for a disabled one.

A deleted service account's member becomes `deleted:serviceAccount:EMAIL?uid=UNIQUE_ID` in every
policy (google/iam/v1/policy.proto, Binding.members), which grants nothing: "If you delete a service
account, then create a new service account with the same name, the new service account is treated as a
separate identity; it does not inherit the roles granted to the deleted service account"
(https://cloud.google.com/iam/docs/service-accounts-delete-undelete).
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2

from launcher.emulator.rpc import ApiError
from launcher.emulator.state import State
from launcher.iam_roles import permissions_of

DEFAULT_USER = "developer@example.com"

# API name and title per gRPC package (the title is what Google's SERVICE_DISABLED message names).
APIS: dict[str, tuple[str, str]] = {
    "google.cloud.run.v2.": ("run.googleapis.com", "Cloud Run Admin API"),
    "google.devtools.cloudbuild.v1.": ("cloudbuild.googleapis.com", "Cloud Build API"),
    "google.devtools.artifactregistry.v1.": ("artifactregistry.googleapis.com", "Artifact Registry API"),
    "google.cloud.secretmanager.v1.": ("secretmanager.googleapis.com", "Secret Manager API"),
    "google.iam.admin.v1.": ("iam.googleapis.com", "Identity and Access Management (IAM) API"),
    "google.logging.v2.": ("logging.googleapis.com", "Cloud Logging API"),
    "google.api.serviceusage.v1.": ("serviceusage.googleapis.com", "Service Usage API"),
    "google.cloud.resourcemanager.v3.": ("cloudresourcemanager.googleapis.com", "Cloud Resource Manager API"),
    "google.cloud.billing.v1.": ("cloudbilling.googleapis.com", "Cloud Billing API"),
    "google.api.cloudquotas.v1.": ("cloudquotas.googleapis.com", "Cloud Quotas API"),
}
STORAGE_API = ("storage.googleapis.com", "Cloud Storage API")
TITLES = dict(APIS.values()) | dict([STORAGE_API])

# Enabled in every new project created with the console or gcloud
# (https://cloud.google.com/service-usage/docs/enabled-service#default), among those the emulator serves.
DEFAULT_ENABLED = frozenset(
    {
        "logging.googleapis.com",
        "storage.googleapis.com",
        "storage-api.googleapis.com",
        "storage-component.googleapis.com",
        "serviceusage.googleapis.com",
        "servicemanagement.googleapis.com",
    }
)

# The permission each method checks, from each method's reference page ("requires the following IAM
# permission on the resource"). Methods not listed (operations, testIamPermissions) check none.
_BY_SERVICE: dict[str, dict[str, str]] = {
    "google.cloud.run.v2.Jobs": {
        "CreateJob": "run.jobs.create",
        "GetJob": "run.jobs.get",
        "ListJobs": "run.jobs.list",
        "UpdateJob": "run.jobs.update",
        "DeleteJob": "run.jobs.delete",
        "RunJob": "run.jobs.run",
    },
    "google.cloud.run.v2.Executions": {
        "GetExecution": "run.executions.get",
        "ListExecutions": "run.executions.list",
        "DeleteExecution": "run.executions.delete",
        "CancelExecution": "run.executions.cancel",
    },
    "google.cloud.run.v2.Tasks": {
        "GetTask": "run.tasks.get",
        "ListTasks": "run.tasks.list",
    },
    "google.devtools.cloudbuild.v1.CloudBuild": {
        "CreateBuild": "cloudbuild.builds.create",
        "GetBuild": "cloudbuild.builds.get",
        "ListBuilds": "cloudbuild.builds.list",
        "CancelBuild": "cloudbuild.builds.update",
    },
    "google.devtools.artifactregistry.v1.ArtifactRegistry": {
        "CreateRepository": "artifactregistry.repositories.create",
        "GetRepository": "artifactregistry.repositories.get",
        "ListRepositories": "artifactregistry.repositories.list",
        "DeleteRepository": "artifactregistry.repositories.delete",
        "ListDockerImages": "artifactregistry.dockerimages.list",
        "GetDockerImage": "artifactregistry.dockerimages.get",
        "GetIamPolicy": "artifactregistry.repositories.getIamPolicy",
        "SetIamPolicy": "artifactregistry.repositories.setIamPolicy",
    },
    "google.cloud.secretmanager.v1.SecretManagerService": {
        "CreateSecret": "secretmanager.secrets.create",
        "GetSecret": "secretmanager.secrets.get",
        "ListSecrets": "secretmanager.secrets.list",
        "UpdateSecret": "secretmanager.secrets.update",
        "DeleteSecret": "secretmanager.secrets.delete",
        "AddSecretVersion": "secretmanager.versions.add",
        "GetSecretVersion": "secretmanager.versions.get",
        "ListSecretVersions": "secretmanager.versions.list",
        "AccessSecretVersion": "secretmanager.versions.access",
        "DisableSecretVersion": "secretmanager.versions.disable",
        "EnableSecretVersion": "secretmanager.versions.enable",
        "DestroySecretVersion": "secretmanager.versions.destroy",
        "GetIamPolicy": "secretmanager.secrets.getIamPolicy",
        "SetIamPolicy": "secretmanager.secrets.setIamPolicy",
    },
    "google.iam.admin.v1.IAM": {
        "CreateServiceAccount": "iam.serviceAccounts.create",
        "GetServiceAccount": "iam.serviceAccounts.get",
        "ListServiceAccounts": "iam.serviceAccounts.list",
        "DeleteServiceAccount": "iam.serviceAccounts.delete",
        "DisableServiceAccount": "iam.serviceAccounts.disable",
        "EnableServiceAccount": "iam.serviceAccounts.enable",
    },
    "google.logging.v2.LoggingServiceV2": {
        "WriteLogEntries": "logging.logEntries.create",
        "ListLogEntries": "logging.logEntries.list",
        "TailLogEntries": "logging.logEntries.list",
    },
    "google.api.serviceusage.v1.ServiceUsage": {
        "EnableService": "serviceusage.services.enable",
        "BatchEnableServices": "serviceusage.services.enable",
        "DisableService": "serviceusage.services.disable",
        "GetService": "serviceusage.services.get",
        "BatchGetServices": "serviceusage.services.get",
        "ListServices": "serviceusage.services.list",
    },
    "google.cloud.resourcemanager.v3.Projects": {
        "GetProject": "resourcemanager.projects.get",
        "GetIamPolicy": "resourcemanager.projects.getIamPolicy",
        "SetIamPolicy": "resourcemanager.projects.setIamPolicy",
    },
    "google.cloud.billing.v1.CloudBilling": {
        # projects.getBillingInfo "requires the resourcemanager.projects.get permission".
        "GetProjectBillingInfo": "resourcemanager.projects.get",
    },
    "google.api.cloudquotas.v1.CloudQuotas": {
        "GetQuotaInfo": "cloudquotas.quotas.get",
        "ListQuotaInfos": "cloudquotas.quotas.get",
    },
}
PERMISSIONS: dict[str, str] = {
    f"{service}/{method}": permission
    for service, methods in _BY_SERVICE.items()
    for method, permission in methods.items()
}
# Methods that attach a service account to a resource also need actAs on that account
# (https://cloud.google.com/iam/docs/service-accounts-actas).
ACTS_AS = {
    "google.cloud.run.v2.Jobs/CreateJob",
    "google.cloud.run.v2.Jobs/UpdateJob",
    "google.devtools.cloudbuild.v1.CloudBuild/CreateBuild",
}

_PROJECT = re.compile(r"(?:^|/)projects/(?P<project>[^/]+)")
_SERVICE_ACCOUNT_MEMBER = re.compile(
    r"^serviceAccount:(?P<email>[^@]+@(?P<project>[^.]+)\.iam\.gserviceaccount\.com)$"
)

PolicySource = Callable[[str], "list[dict[str, Any]]"]
# Renames a member (old, new) in every policy of one kind of resource.
MemberRenamer = Callable[[str, str], None]


def project_number(project: str) -> str:
    """The 12-digit number the emulator gives a project id (a number is its own number)."""
    if project.isdigit():
        return project
    digest = int(hashlib.sha256(project.encode()).hexdigest(), 16)
    return str(10**11 + digest % (9 * 10**11))


def compute_default_account(project: str) -> str:
    """What a Cloud Run task or a build runs as when no service account is named."""
    return f"{project_number(project)}-compute@developer.gserviceaccount.com"


def error_info(reason: str, domain: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)


class Access:
    def __init__(
        self,
        state: State,
        *,
        user: str = DEFAULT_USER,
        propagation_s: float = 0.0,
        api_propagation_s: float = 0.0,
        grant_propagation_s: float = 0.0,
        enabled_apis: Iterable[str] = DEFAULT_ENABLED,
        billing_enabled: bool = True,
    ) -> None:
        self.state = state
        self.user = f"user:{user}"
        self.propagation_s = propagation_s
        self.api_propagation_s = api_propagation_s
        self.grant_propagation_s = grant_propagation_s
        # A stored policy's etag -> when each (role, member) binding it added was added; a policy's etag
        # changes with every write, so a grant is pending only in the policy that made it.
        self._granted_at: dict[str, dict[tuple[str, str], float]] = {}
        # (role, member) of the pending grants that a permission check has ignored, for tests.
        self.held_back: set[tuple[str, str]] = set()
        self.default_enabled = frozenset(enabled_apis)
        self.billing_enabled = billing_enabled
        # token -> (member, the unique id of the service account it was issued to, None for others)
        self._tokens: dict[str, tuple[str, str | None]] = {}
        self._policy_sources: list[tuple[re.Pattern[str], PolicySource]] = []
        self._member_renamers: list[MemberRenamer] = []

    # ---- callers

    def issue_token(self, member: str) -> str:
        token = "ya29.emulator-" + secrets.token_urlsafe(24)
        self._tokens[token] = (member, self._unique_id(member))
        return token

    def _unique_id(self, member: str) -> str | None:
        stored = self._stored_account(member)
        return stored["unique_id"] if stored else None

    def _stored_account(self, member: str) -> dict[str, Any] | None:
        match = _SERVICE_ACCOUNT_MEMBER.match(member)
        return self.state.table("service_accounts").get(match["email"]) if match else None

    def unusable_account(self, email: str) -> str | None:
        """Why nothing can run as the user-managed account `email` (deleted, or disabled), else None.

        Running as an account means getting access tokens for it, which fail for a disabled one
        ("requests for new access tokens will fail", iam.py) as for one that no longer exists. Google's
        own accounts (the Compute Engine default one) are not kept here: None.
        """
        member = f"serviceAccount:{email}"
        if not _SERVICE_ACCOUNT_MEMBER.match(member):
            return None
        stored = self._stored_account(member)
        if stored is None:
            return f"service account {email} does not exist"
        if stored.get("disabled"):
            return f"service account {email} is disabled"
        return None

    def caller(self, authorization: str | None) -> str:
        """The member (user:x or serviceAccount:x) behind an Authorization header."""
        if not authorization:
            return self.user
        scheme, _, token = authorization.partition(" ")
        member, unique_id = (
            self._tokens.get(token.strip(), ("", None)) if scheme.lower() == "bearer" else ("", None)
        )
        # A token of a service account disabled, or since deleted (or deleted and made again: another
        # identity) is refused: "Existing access tokens for the service account are rejected" is what IAM
        # documents for a disabled one, accepted again once it is enabled
        # (https://cloud.google.com/iam/docs/reference/rest/v1/projects.serviceAccounts/disable), and a
        # deleted one can no longer authenticate at all
        # (https://cloud.google.com/iam/docs/service-accounts-delete-undelete). Rejected credentials are
        # UNAUTHENTICATED (https://cloud.google.com/apis/design/errors).
        stored = self._stored_account(member) if unique_id is not None else None
        if not member or (
            unique_id is not None
            and (stored is None or stored["unique_id"] != unique_id or stored.get("disabled", False))
        ):
            raise ApiError(
                grpc.StatusCode.UNAUTHENTICATED,
                "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
                "cookie or other valid authentication credential.",
            )
        return member

    # ---- projects

    def project(self, project: str) -> dict[str, Any]:
        """A project's record (id, number, policy, enabled APIs, billing), made on first use.

        Every project the CLI user names exists and is theirs: `add_project` makes others'.
        """
        project_id = self.project_id(project)
        # Every request reads its project several times: only the first use writes the state file.
        record = self.state.table("projects").get(project_id)
        if record is not None:
            return record
        with self.state.transaction() as tables:
            return tables["projects"].setdefault(project_id, self._new_project(project_id, self.user))

    def add_project(self, project_id: str, owner: str) -> None:
        with self.state.transaction() as tables:
            tables["projects"][project_id] = self._new_project(project_id, owner)

    def _new_project(self, project_id: str, owner: str) -> dict[str, Any]:
        return {
            "number": project_number(project_id),
            "policy": {
                "version": 1,
                "etag": "BwYAAA==",
                "bindings": [{"role": "roles/owner", "members": [owner]}],
            },
            "services": sorted(self.default_enabled),
            "billing_enabled": self.billing_enabled,
        }

    def project_id(self, project: str) -> str:
        if not project.isdigit():
            return project
        for project_id, record in self.state.table("projects").items():
            if record["number"] == project:
                return project_id
        return project

    def update_project(self, project: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        project_id = self.project_id(project)
        self.project(project_id)
        with self.state.transaction() as tables:
            record = tables["projects"][project_id]
            change(record)
            return record

    # ---- APIs

    def apis_enabled(self, project: str, apis: Iterable[str]) -> None:
        """Service Usage enabled `apis` now: on, and served once `api_propagation_s` has passed."""
        now = time.time()

        def add(record: dict[str, Any]) -> None:
            newly = set(apis) - set(record["services"])
            record["services"] = sorted(set(record["services"]) | newly)
            record["enabled_at"] = {**record.get("enabled_at", {}), **dict.fromkeys(newly, now)}

        self.update_project(project, add)

    def require_enabled(self, project: str, api: str, title: str) -> None:
        record = self.project(project)
        enabled_at = record.get("enabled_at", {}).get(api)
        if api in record["services"] and (
            enabled_at is None or time.time() - enabled_at >= self.api_propagation_s
        ):
            return
        number = record["number"]
        url = f"https://console.developers.google.com/apis/api/{api}/overview?project={number}"
        raise ApiError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{title} has not been used in project {number} before or it is disabled. Enable it by visiting "
            f"{url} then retry. If you enabled this API recently, wait a few minutes for the action to "
            "propagate to our systems and retry.",
            details=[
                error_info(
                    "SERVICE_DISABLED",
                    "googleapis.com",
                    consumer=f"projects/{number}",
                    service=api,
                    serviceTitle=title,
                    activationUrl=url,
                )
            ],
        )

    # ---- IAM

    def add_policy_source(self, pattern: str, source: PolicySource) -> None:
        """Resources named like `pattern` carry their own policy, which `source(name)` returns."""
        self._policy_sources.append((re.compile(pattern), source))

    def policies(self, project: str, resource: str) -> list[dict[str, Any]]:
        found = [self.project(project)["policy"]]
        for pattern, source in self._policy_sources:
            match = pattern.match(resource)
            if match:
                found += source(match[0])
        return found

    def allowed(self, member: str, permission: str, project: str, resource: str = "") -> bool:
        project_id = self.project_id(project)
        pending: set[tuple[str, str]] = set()
        for policy in self.policies(project_id, resource):
            granted_at = self._granted_at.get(str(policy.get("etag")), {})
            for binding in policy.get("bindings") or []:
                members = binding.get("members") or []
                if permission not in permissions_of(binding["role"]):
                    continue
                for who in {member, "allUsers"} & set(members):
                    grant = (binding["role"], who)
                    if time.time() - granted_at.get(grant, 0.0) >= self.grant_propagation_s:
                        return True
                    pending.add(grant)
        if pending:
            self.held_back = self.held_back | pending  # a new set: a test's thread may be reading it
        return False

    def policy_replaced(self, before: dict[str, Any] | None, after: dict[str, Any]) -> None:
        """A setIamPolicy stored `after` over `before`: each binding it adds takes effect later."""
        now = time.time()
        earlier = self._granted_at.get(str((before or {}).get("etag")), {})
        kept = _grants(before)
        self._granted_at[str(after.get("etag"))] = {
            grant: earlier.get(grant, now)
            for grant in _grants(after)
            if grant not in kept or grant in earlier
        }

    def grants_propagated(self, grants: set[tuple[str, str]] | None = None) -> None:
        """The (role, member) `grants` (None: all) made so far are in effect, as minutes later: for tests."""
        for granted_at in list(self._granted_at.values()):
            for grant in list(granted_at) if grants is None else grants:
                granted_at.pop(grant, None)

    def require(self, member: str, permission: str, project: str, resource: str) -> None:
        if not self.allowed(member, permission, project, resource):
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).",
                details=[
                    error_info(
                        "IAM_PERMISSION_DENIED",
                        "iam.googleapis.com",
                        permission=permission,
                        resource=resource,
                    )
                ],
            )

    def add_member_renamer(self, renamer: MemberRenamer) -> None:
        """`renamer(old, new)` renames a member in the policies of resources that carry their own."""
        self._member_renamers.append(renamer)

    def service_account_deleted(self, email: str, unique_id: str) -> None:
        """Every policy's grants to the account now name it as deleted (see the module's docstring)."""
        old = f"serviceAccount:{email}"
        new = f"deleted:{old}?uid={unique_id}"
        with self.state.transaction() as tables:
            for record in tables["projects"].values():
                rename_member(record["policy"], old, new)
        for renamer in self._member_renamers:
            renamer(old, new)

    def unknown_member(self, member: str) -> str | None:
        """Why a policy may not name `member` yet (a service account unknown or too new), else None."""
        match = _SERVICE_ACCOUNT_MEMBER.match(member)
        if not match:
            return None
        email = match["email"]
        if email not in self.state.table("service_accounts"):
            return f"Service account {email} does not exist."
        created = self.state.table("service_account_created").get(email, 0.0)
        if time.time() - created < self.propagation_s:
            return f"Service account {email} does not exist."
        return None

    def _missing_account(self, email: str) -> bool:
        """Whether `email` is a user-managed account (the only kind IAM here keeps) that does not exist."""
        return bool(
            _SERVICE_ACCOUNT_MEMBER.match(f"serviceAccount:{email}")
        ) and email not in self.state.table("service_accounts")

    def service_account_created(self, email: str) -> None:
        with self.state.transaction() as tables:
            tables["service_account_created"][email] = time.time()

    # ---- the gate every gRPC method passes

    def gate(self, method: str, request: dict[str, Any], authorization: str | None) -> None:
        api = next((value for prefix, value in APIS.items() if method.startswith(prefix)), None)
        if api is None:
            return
        member = self.caller(authorization)
        resource = _resource_of(request)
        match = _PROJECT.search(resource) or _PROJECT.search(_project_hint(request))
        if match is None:
            return
        project = self.project_id(match["project"])
        self.require_enabled(project, *api)
        permission = PERMISSIONS.get(method)
        if permission is None:
            return
        if method == "google.cloud.run.v2.Jobs/RunJob" and request.get("overrides"):
            permission = "run.jobs.runWithOverrides"
        self.require(member, permission, project, resource)
        if method in ACTS_AS:
            account = _service_account_of(method, request)
            if account:
                name = f"projects/{project}/serviceAccounts/{account}"
                # actAs is checked on the account as a resource, so one that does not exist (deleted by
                # hand) is refused even to an owner, in the same words as a missing grant: "Permission
                # 'iam.serviceaccounts.actAs' denied on service account X (or it may not exist)"
                # (https://cloud.google.com/run/docs/configuring/services/service-accounts: "the deployer
                # account must have access on the service identity resource";
                # https://cloud.google.com/build/docs/securing-builds/configure-user-specified-service-accounts).
                if self._missing_account(account) or not self.allowed(
                    member, "iam.serviceAccounts.actAs", project, name
                ):
                    raise ApiError(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"Permission 'iam.serviceaccounts.actAs' denied on service account {account} (or it "
                        "may not exist).",
                        details=[
                            error_info(
                                "IAM_PERMISSION_DENIED",
                                "iam.googleapis.com",
                                permission="iam.serviceAccounts.actAs",
                                resource=name,
                            )
                        ],
                    )


def rename_member(policy: dict[str, Any] | None, old: str, new: str) -> bool:
    """Rename `old` to `new` in a stored policy, giving it a new etag; True when it named `old`."""
    if not policy:
        return False
    renamed = False
    for binding in policy.get("bindings") or []:
        members = binding.get("members") or []
        if old in members:
            binding["members"] = [new if member == old else member for member in members]
            renamed = True
    if renamed:
        # The policy changed: a read-modify-write begun before must re-read it (ABORTED / 412).
        policy["etag"] = base64.b64encode(uuid.uuid4().bytes[:8]).decode()
    return renamed


def _grants(policy: dict[str, Any] | None) -> set[tuple[str, str]]:
    return {
        (binding["role"], member)
        for binding in (policy or {}).get("bindings") or []
        for member in binding.get("members") or []
    }


def _resource_of(request: dict[str, Any]) -> str:
    for key in ("name", "resource", "parent", "logName"):
        value = request.get(key)
        if isinstance(value, str) and value:
            return value
    names = request.get("resourceNames")
    if names:
        return str(names[0])
    job = request.get("job") or {}
    return str(job.get("name") or "")


def _project_hint(request: dict[str, Any]) -> str:
    project = request.get("projectId")
    return f"projects/{project}" if project else ""


def _service_account_of(method: str, request: dict[str, Any]) -> str:
    if method.endswith("CreateBuild"):
        account = (request.get("build") or {}).get("serviceAccount") or ""
        return account.rsplit("/", 1)[-1]
    job = request.get("job") or {}
    return ((job.get("template") or {}).get("template") or {}).get("serviceAccount") or ""
