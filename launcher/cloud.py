"""The only place that builds Google Cloud clients.

Normally they use Application Default Credentials; none found is a UserError saying how to log in.
When GEMMA_LAUNCH_EMULATOR_HOST is set (the CLI rehearsing locally), every gRPC client talks to the
local emulator over one insecure channel without credentials, which the emulator takes as its project
owner, and storage follows google-cloud-storage's own STORAGE_EMULATOR_HOST convention. Inside an
emulated task only STORAGE_EMULATOR_HOST is set: ADC finds the job's service account through the
emulated metadata server, as on Cloud Run. Callers pass `RETRY` on each call.

An emulator that is not running refuses the connection, which RETRY would take for a transient outage
and retry for two minutes: the first call to each side of the emulator checks first that something
listens there, and says at once how to start it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from functools import cached_property
from urllib.parse import urlsplit

import google.auth
import google.auth.exceptions
import grpc
import requests
import urllib3
from google.api_core import exceptions, retry
from google.api_core.future import polling
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import (
    artifactregistry_v1,
    billing_v1,
    cloudquotas_v1,
    iam_admin_v1,
    resourcemanager_v3,
    run_v2,
    secretmanager_v1,
    service_usage_v1,
    storage,
)
from google.cloud.artifactregistry_v1.services.artifact_registry.transports.grpc import (
    ArtifactRegistryGrpcTransport,
)
from google.cloud.billing_v1.services.cloud_billing.transports.grpc import CloudBillingGrpcTransport
from google.cloud.billing_v1.services.cloud_catalog.transports.grpc import CloudCatalogGrpcTransport
from google.cloud.cloudquotas_v1.services.cloud_quotas.transports.grpc import CloudQuotasGrpcTransport
from google.cloud.devtools import cloudbuild_v1
from google.cloud.devtools.cloudbuild_v1.services.cloud_build.transports.grpc import CloudBuildGrpcTransport
from google.cloud.iam_admin_v1.services.iam.transports.grpc import IAMGrpcTransport
from google.cloud.logging_v2.services.logging_service_v2 import LoggingServiceV2Client
from google.cloud.logging_v2.services.logging_service_v2.transports.grpc import LoggingServiceV2GrpcTransport
from google.cloud.resourcemanager_v3.services.projects.transports.grpc import ProjectsGrpcTransport
from google.cloud.run_v2.services.executions.transports.grpc import ExecutionsGrpcTransport
from google.cloud.run_v2.services.jobs.transports.grpc import JobsGrpcTransport
from google.cloud.run_v2.services.tasks.transports.grpc import TasksGrpcTransport
from google.cloud.secretmanager_v1.services.secret_manager_service.transports.grpc import (
    SecretManagerServiceGrpcTransport,
)
from google.cloud.service_usage_v1.services.service_usage.transports.grpc import ServiceUsageGrpcTransport
from google.cloud.storage.exceptions import InvalidResponse

from launcher.errors import UserError

EMULATOR_ENV = "GEMMA_LAUNCH_EMULATOR_HOST"

RETRY_DEADLINE_ENV = "GEMMA_LAUNCH_RETRY_DEADLINE"

TRANSIENT = (
    exceptions.ServiceUnavailable,
    exceptions.DeadlineExceeded,
    exceptions.TooManyRequests,
    exceptions.InternalServerError,
    exceptions.BadGateway,
    exceptions.GatewayTimeout,
    # Storage speaks HTTP: a reset or dropped connection surfaces as these, not as an API error.
    ConnectionError,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.Timeout,
    urllib3.exceptions.ProtocolError,
    google.auth.exceptions.TransportError,
)
# Storage uploads and downloads report a bad status as InvalidResponse, not as an API error.
_TRANSIENT_HTTP = {408, 429, 500, 502, 503, 504}


class Recent:
    """What this process changed in Google Cloud moments ago: each name counts as recent for `window_s`
    seconds after `mark`, the time Google may take to put such a change in effect everywhere."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._at: dict[str, float] = {}

    def mark(self, names: list[str]) -> None:
        self._at.update(dict.fromkeys(names, time.monotonic()))

    def __contains__(self, name: object) -> bool:
        at = self._at.get(name) if isinstance(name, str) else None
        return at is not None and time.monotonic() - at < self.window_s

    def __iter__(self) -> Iterator[str]:
        return (name for name in list(self._at) if name in self)


# An API just enabled is not served at once: its calls may answer SERVICE_DISABLED for a few minutes,
# as that answer's own message says ("If you enabled this API recently, wait a few minutes for the
# action to propagate to our systems and retry"). For APIs this process enabled (`up`), that answer
# is transient; for any other API it means what it says, and is reported at once.
API_PROPAGATION_S = 300.0
ENABLED = Recent(API_PROPAGATION_S)

# A role just granted is not in effect at once either: "Changes to allow or deny policies typically
# propagate in 2 minutes, but could potentially take 7 minutes or longer"
# (https://cloud.google.com/iam/docs/access-change-propagation), and Google's advice is to retry. `up`
# grants roles to its service accounts and uses them moments later (Cloud Run checks the job's account
# can read the secret when the job is created, a build reads the source and pushes the image as its
# account): a refusal that names an account this process granted roles to is retried that long.
GRANT_PROPAGATION_S = 420.0
GRANTED = Recent(GRANT_PROPAGATION_S)


def refused_new_grant(error: BaseException) -> str | None:
    """The account a PERMISSION_DENIED names when this process granted it roles moments ago, else None.

    Not an actAs refusal: that one names the account as the resource, and is the caller's own."""
    if not isinstance(error, exceptions.PermissionDenied | exceptions.Forbidden):
        return None
    text = str(error)
    if "iam.serviceaccounts.actas" in text.lower():
        return None
    return next((account for account in GRANTED if account in text), None)


def _still_propagating(error: BaseException) -> bool:
    if refused_new_grant(error):
        return True
    if getattr(error, "reason", None) != "SERVICE_DISABLED":
        return False
    return (getattr(error, "metadata", None) or {}).get("service", "") in ENABLED


def is_transient(error: BaseException) -> bool:
    if isinstance(error, InvalidResponse):
        return error.response.status_code in _TRANSIENT_HTTP
    return isinstance(error, TRANSIENT) or _still_propagating(error)


def retry_deadline_s() -> float:
    """How long transient errors are retried: 120 s, or $GEMMA_LAUNCH_RETRY_DEADLINE seconds."""
    try:
        return float(os.environ.get(RETRY_DEADLINE_ENV) or 120.0)
    except ValueError:
        return 120.0


# Transient failures are retried with jittered exponential backoff until the deadline, then the
# last error surfaces and the caller turns it into a message that names the resource.
RETRY = retry.Retry(
    predicate=is_transient,
    initial=0.2,
    maximum=5.0,
    multiplier=2.0,
    timeout=retry_deadline_s(),
)

# How a long-running operation is polled: google-api-core's default first waits a whole second, then
# 1.5x longer each time; the operations `up` waits on (enabling APIs, a repository, a job create or
# update, a cancel) usually finish within a second, so the first checks come sooner.
POLLING = polling.DEFAULT_POLLING.with_delay(initial=0.1, maximum=10.0, multiplier=2.0)


def _adc() -> Credentials | None:
    try:
        credentials, _ = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return None
    return credentials


def emulator_host() -> str | None:
    return os.environ.get(EMULATOR_ENV) or None


def check_emulator(variable: str) -> None:
    """A UserError, at once, when nothing listens at the emulator address that $`variable` holds."""
    address = os.environ.get(variable, "")
    host, port = _host_port(address)
    if not host or not port:
        return  # not host:port: the client reports it
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError as error:
        ports = {"--port": EMULATOR_ENV, "--storage-port": "STORAGE_EMULATOR_HOST"}
        same = "".join(
            f" {flag} {number}"
            for flag, name in ports.items()
            if (number := _host_port(os.environ.get(name, ""))[1])
        )
        raise UserError(
            f"The gemma-launch emulator is not running: nothing answers at {address} (${variable}: "
            f"{error.strerror or error}).",
            "Start it in another terminal on the same ports, so this shell's exports stay right: "
            f"`gemma-launch emulator start{same}` (with the --data-dir it had, to keep its state). Or "
            f"`unset {EMULATOR_ENV} STORAGE_EMULATOR_HOST` to use Google Cloud.",
        ) from None


def _host_port(address: str) -> tuple[str | None, int | None]:
    """("127.0.0.1", 8085) from 127.0.0.1:8085 or http://127.0.0.1:8085."""
    parts = urlsplit(address if "//" in address else f"//{address}")
    try:
        return parts.hostname, parts.port
    except ValueError:
        return None, None


class Clients:
    """One client per service, built on first use."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.emulator = emulator_host()

    @cached_property
    def _channel(self) -> grpc.Channel:
        assert self.emulator
        check_emulator(EMULATOR_ENV)
        return grpc.insecure_channel(self.emulator)

    @cached_property
    def credentials(self) -> Credentials | None:
        """Application Default Credentials; None against the emulator, whose callers carry none."""
        if self.emulator:
            return None
        credentials = _adc()
        if credentials is None:
            raise UserError(
                "No Google Cloud credentials found (Application Default Credentials).",
                "Run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS to a "
                "service account key file), then run the command again.",
            )
        return credentials

    def _build(self, client_cls, transport_cls):
        if self.emulator:
            return client_cls(transport=transport_cls(channel=self._channel))
        return client_cls(credentials=self.credentials)

    @cached_property
    def service_usage(self) -> service_usage_v1.ServiceUsageClient:
        return self._build(service_usage_v1.ServiceUsageClient, ServiceUsageGrpcTransport)

    @cached_property
    def projects(self) -> resourcemanager_v3.ProjectsClient:
        return self._build(resourcemanager_v3.ProjectsClient, ProjectsGrpcTransport)

    @cached_property
    def billing(self) -> billing_v1.CloudBillingClient:
        return self._build(billing_v1.CloudBillingClient, CloudBillingGrpcTransport)

    @cached_property
    def catalog(self) -> billing_v1.CloudCatalogClient:
        return self._build(billing_v1.CloudCatalogClient, CloudCatalogGrpcTransport)

    @cached_property
    def iam(self) -> iam_admin_v1.IAMClient:
        return self._build(iam_admin_v1.IAMClient, IAMGrpcTransport)

    @cached_property
    def secrets(self) -> secretmanager_v1.SecretManagerServiceClient:
        return self._build(secretmanager_v1.SecretManagerServiceClient, SecretManagerServiceGrpcTransport)

    @cached_property
    def registry(self) -> artifactregistry_v1.ArtifactRegistryClient:
        return self._build(artifactregistry_v1.ArtifactRegistryClient, ArtifactRegistryGrpcTransport)

    @cached_property
    def builds(self) -> cloudbuild_v1.CloudBuildClient:
        return self._build(cloudbuild_v1.CloudBuildClient, CloudBuildGrpcTransport)

    @cached_property
    def jobs(self) -> run_v2.JobsClient:
        return self._build(run_v2.JobsClient, JobsGrpcTransport)

    @cached_property
    def executions(self) -> run_v2.ExecutionsClient:
        return self._build(run_v2.ExecutionsClient, ExecutionsGrpcTransport)

    @cached_property
    def tasks(self) -> run_v2.TasksClient:
        return self._build(run_v2.TasksClient, TasksGrpcTransport)

    @cached_property
    def quotas(self) -> cloudquotas_v1.CloudQuotasClient:
        return self._build(cloudquotas_v1.CloudQuotasClient, CloudQuotasGrpcTransport)

    @cached_property
    def logging(self) -> LoggingServiceV2Client:
        return self._build(LoggingServiceV2Client, LoggingServiceV2GrpcTransport)

    @cached_property
    def storage(self) -> storage.Client:
        if self.emulator:
            check_emulator("STORAGE_EMULATOR_HOST")
            return storage.Client(project=self.project, credentials=AnonymousCredentials())
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            # In an emulated task ADC finds the job's account (metadata server); elsewhere, no
            # credentials is the emulator's own user, as the gRPC clients above are.
            return storage.Client(project=self.project, credentials=_adc() or AnonymousCredentials())
        return storage.Client(project=self.project, credentials=self.credentials)
