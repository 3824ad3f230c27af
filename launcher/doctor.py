"""`gemma-launch doctor`: read-only checks of what `up` and `run` need, each failure with its fix.

Nothing here changes anything. In order, each check and what it calls:
1. credentials: Application Default Credentials, refreshed once to prove they work (the emulator's
   caller against the emulator, which takes requests without credentials as its project owner);
2. project: Resource Manager GetProject (resourcemanager.projects.get); billing: Cloud Billing
   GetProjectBillingInfo (resourcemanager.projects.get);
3. APIs: Service Usage BatchGetServices (serviceusage.services.get) for apis.REQUIRED;
4. permissions: Resource Manager TestIamPermissions on the project (needs no permission) for
   UP_PERMISSIONS, each missing one named with the smallest predefined role that grants it;
5. GPU region: settings_rules' GPU_REGIONS table, and launcher.gpus (can the image use the GPU), no call;
6. GPU quota: Cloud Quotas GetQuotaInfo (cloudquotas.quotas.get), through quota.read;
7. build location: settings_rules' RESTRICTED_BUILD_REGIONS, no call;
8. bucket: Cloud Storage buckets.get (storage.buckets.get): 404 = free, readable = ours when its
   project number is this project's, 403 = another project's;
9. service accounts: IAM GetServiceAccount (iam.serviceAccounts.get) for the job's and the build's,
   and Cloud Run GetJob (run.jobs.get) when one is missing: missing while the job exists means it
   was deleted after `up`, which `up` repairs; a disabled one stops `up`, which leaves it disabled.

A check whose API is still off (a new project has Resource Manager, Cloud Billing and Cloud Quotas off)
cannot be made: it fails with status "unchecked" and the fix "`gemma-launch up` enables the APIs".
`up` runs the checks it cannot fix itself first (`check_before_up`), enables the APIs, makes the
unchecked ones again, and creates nothing while one of them fails. A transient error retried past
its deadline is not a check result: it stops doctor (and `up`) with the usual Error / Hint.
"""

from __future__ import annotations

from collections.abc import Callable

from google.api_core import exceptions

from launcher import doctor_checks
from launcher.cloud import Clients
from launcher.cloud_errors import disabled_api, translate
from launcher.doctor_checks import FAILED, TITLES, UNCHECKED, Check, Found, Step, unchecked
from launcher.errors import UserError
from launcher.settings import Settings

STEPS: tuple[tuple[str, Step], ...] = (
    ("credentials", doctor_checks.check_credentials),
    ("project", doctor_checks.check_project),
    ("billing", doctor_checks.check_billing),
    ("apis", doctor_checks.check_apis),
    ("permissions", doctor_checks.check_permissions),
    ("gpu_region", doctor_checks.check_gpu_region),
    ("gpu_quota", doctor_checks.check_gpu_quota),
    ("build_location", doctor_checks.check_build_location),
    ("bucket", doctor_checks.check_bucket),
    ("service_accounts", doctor_checks.check_service_accounts),
)
# Made without a call: they need no credentials.
_OFFLINE = {"gpu_region", "build_location"}
# What `up` cannot fix itself; it enables the APIs and only warns about the GPU quota. Of the service
# accounts, only a disabled one stops it (a missing one it creates).
UP_CHECKS = ("credentials", "project", "billing", "permissions", "gpu_region", "bucket", "service_accounts")


def _run(clients: Clients, settings: Settings, names: tuple[str, ...], found: Found) -> list[Check]:
    checks: list[Check] = []
    for name, step in STEPS:
        if name not in names:
            continue
        if name not in _OFFLINE and checks and checks[0].name == "credentials" and not checks[0].passed:
            checks.append(
                Check(
                    name, UNCHECKED, "Cannot check without working credentials.", "Fix the credentials first."
                )
            )
            continue
        checks.append(_attempt(name, step, clients, settings, found))
    return checks


def _attempt(name: str, step: Step, clients: Clients, settings: Settings, found: Found) -> Check:
    try:
        return step(clients, settings, found)
    except exceptions.GoogleAPICallError as error:
        if api := disabled_api(error):
            return unchecked(name, api, settings)
        explained = translate(error, settings, TITLES[name])
        return Check(name, FAILED, explained.message, explained.hint)


def run_checks(clients: Clients, settings: Settings) -> list[Check]:
    """Every check, in order."""
    return _run(clients, settings, tuple(name for name, _ in STEPS), Found())


def check_before_up(clients: Clients, settings: Settings) -> Callable[[], None]:
    """Stop `up` (a UserError) when a check fails that `up` cannot fix; changes nothing.

    Returns what `up` calls once it has enabled the APIs: the checks their being off prevented, made
    again, stopping it the same way before it creates anything.
    """
    found = Found()
    checks = _run(clients, settings, UP_CHECKS, found)
    _stop_on_failures(checks, settings)
    pending = tuple(check.name for check in checks if check.status == UNCHECKED)

    def after_apis() -> None:
        if pending:
            # The project check comes first again when it is pending: the bucket check needs its number.
            _stop_on_failures(_run(clients, settings, pending, found), settings)

    return after_apis


def _stop_on_failures(checks: list[Check], settings: Settings) -> None:
    stopping = [check for check in checks if check.status == FAILED and check.stops_up]
    if not stopping:
        return
    raise UserError(
        "Stopped before creating anything: "
        + " ".join(f"{TITLES[check.name]}: {check.detail}" for check in stopping),
        " ".join(check.fix for check in stopping if check.fix) + " `gemma-launch doctor` shows every check.",
    )
