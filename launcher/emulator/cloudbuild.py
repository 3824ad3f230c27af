"""Cloud Build v1: CreateBuild (long-running), GetBuild, ListBuilds, CancelBuild.

There is no Docker engine here: cloudbuild_builder.py carries out a build's steps, and
cloudbuild_substitutions.py checks and applies its substitutions.

Builds run in a background thread through QUEUED -> WORKING -> SUCCESS / FAILURE / CANCELLED, writing
their log lines to the Logging emulator with short pauses, so clients can stream them as they happen.
The build's operation stays not-done until the build ends.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
from google.cloud.devtools import cloudbuild_v1
from google.longrunning import operations_pb2
from google.rpc import status_pb2

from launcher.emulator.access import Access, project_number
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.cloudbuild_builder import (
    BuildFailed,
    BuildRun,
    BuildStopped,
    Status,
    utc_now,
)
from launcher.emulator.cloudbuild_substitutions import BUILD_NAME, resolved
from launcher.emulator.logging import Logging, parse_filter
from launcher.emulator.rpc import (
    Hub,
    Method,
    failed_precondition,
    invalid,
    not_found,
    service_handler,
    to_dict,
)
from launcher.emulator.state import State
from launcher.emulator.storage import CloudStorage
from launcher.settings_rules import RESTRICTED_BUILD_REGIONS

_RUNNING = (Status.PENDING, Status.QUEUED, Status.WORKING)
_PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
# A new project is among those Cloud Build may restrict to a few regions (settings.RESTRICTED_BUILD_REGIONS,
# with its source), so the emulator behaves like one unless told otherwise. `global` always works.
RESTRICTED_REGIONS = RESTRICTED_BUILD_REGIONS
# What CreateBuild answers elsewhere, as reported in e.g.
# https://github.com/google-github-actions/deploy-cloudrun/issues/480 (newer replies add the link).
_RESTRICTED_REGION_MESSAGE = (
    "failed precondition: due to quota restrictions, cannot run builds in this region, see "
    "https://cloud.google.com/build/docs/locations#restricted_regions_for_some_projects"
)
# An operation the Operations service must report as not done until the build thread publishes again.
_NOT_DONE = sys.float_info.max
_OWN_LOGS = (
    cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY,
    cloudbuild_v1.BuildOptions.LoggingMode.NONE,
)
_DEFAULT_PAGE_SIZE = 50
_SERVICE_ACCOUNT = re.compile(r"^projects/[^/]+/serviceAccounts/[^/]+$")
_LIST_FIELDS = (("status",), ("id",), ("tags",), ("images",))
# How an ended build's operation fails (google.rpc.Code, message), as the service reports it.
_OPERATION_ERRORS = {
    Status.FAILURE: (2, "Build failed; check build logs for details"),
    Status.INTERNAL_ERROR: (13, "Build failed with an internal error"),
    Status.CANCELLED: (1, "Build was cancelled"),
}


def _check_steps(steps: list[cloudbuild_v1.BuildStep]) -> None:
    """Each step names its builder; ids are unique and `wait_for` names earlier steps (or "-", the start).

    The proto comment of BuildStep.id ("Unique identifier for this build step, used in wait_for"), and
    https://cloud.google.com/build/docs/configuring-builds/configure-build-step-order: "Steps must be
    defined with the id field prior to being used as waitFor dependencies"; "-" is the build's start.
    """
    ids: set[str] = set()
    for index, step in enumerate(steps):
        if not step.name:
            raise invalid(f"invalid build: steps[{index}].name (the builder image) must be set.")
        for wanted in step.wait_for:
            if wanted != "-" and wanted not in ids:
                raise invalid(
                    f'invalid build: build step #{index} - "{step.id}": waitFor "{wanted}" is not the id '
                    "of a previous build step"
                )
        if step.id in ids:
            raise invalid(f'invalid build: build step #{index}: id "{step.id}" is not unique')
        if step.id:
            ids.add(step.id)


class CloudBuild:
    # Pause after each log line, so a client tailing the build sees the lines arrive one by one.
    line_pause_s = 0.02

    def __init__(
        self,
        state: State,
        *,
        access: Access,
        storage: CloudStorage,
        registry: ArtifactRegistry,
        logging: Logging,
        data_dir: Path,
        build_regions: frozenset[str] | None,
    ) -> None:
        """CreateBuild is accepted in `global` and `build_regions` only (None: everywhere)."""
        self.state = state
        self.access = access
        self.storage = storage
        self.registry = registry
        self.logging = logging
        self.data_dir = data_dir
        self.build_regions = build_regions
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._abandon_interrupted_builds()

    def image_dir(self, digest: str) -> Path:
        """The filesystem snapshot of a built image (its .image.json holds entrypoint, cmd, workdir, env)."""
        return self.data_dir / "images" / digest

    # ---- storage of builds and their operations ----------------------------------------------------

    def _load(self, build_id: str) -> tuple[cloudbuild_v1.Build, str]:
        stored = self.state.table("builds")[build_id]
        return cloudbuild_v1.Build.from_json(json.dumps(stored["build"])), stored["operation"]

    def _save(
        self, build: cloudbuild_v1.Build, operation: str, *, by_runner: bool = True
    ) -> operations_pb2.Operation:
        """Store the build and publish its operation (done once the build has ended)."""
        wire = operations_pb2.Operation(name=operation)
        wire.metadata.Pack(
            cloudbuild_v1.BuildOperationMetadata.pb(cloudbuild_v1.BuildOperationMetadata(build=build))
        )
        done = build.status not in _RUNNING
        if build.status == Status.SUCCESS:
            wire.response.Pack(cloudbuild_v1.Build.pb(build))
        elif done:
            code, message = _OPERATION_ERRORS[build.status]
            wire.error.CopyFrom(status_pb2.Status(code=code, message=message))
        with self.state.transaction() as tables:
            previous = tables["builds"].get(build.id)
            if by_runner and previous and previous["status"] == Status.CANCELLED.name:
                raise BuildStopped
            tables["builds"][build.id] = {
                "build": to_dict(build),
                "operation": operation,
                "project": build.project_id,
                "status": build.status.name,
            }
            # The shared Operations service reads this table; an entry's done_at says when it is done.
            tables["operations"][operation] = {
                "done_at": time.time() if done else _NOT_DONE,
                "operation": base64.b64encode(wire.SerializeToString()).decode(),
            }
        return wire

    def _abandon_interrupted_builds(self) -> None:
        """Builds that were running when a previous emulator stopped can never finish: end them."""
        for build_id, stored in list(self.state.table("builds").items()):
            if Status[stored["status"]] in _RUNNING:
                build, operation = self._load(build_id)
                build.status = Status.INTERNAL_ERROR
                build.status_detail = "The emulator stopped while the build was running."
                build.finish_time = utc_now()
                self._save(build, operation, by_runner=False)

    # ---- handlers -----------------------------------------------------------------------------------

    @staticmethod
    def _project_location(project_id: str, parent: str) -> tuple[str, str]:
        if parent:
            match = _PARENT.match(parent)
            if not match:
                raise invalid(f"Invalid parent {parent!r}: expected projects/PROJECT/locations/LOCATION.")
            if project_id and project_id != match["project"]:
                raise invalid(f"project_id {project_id!r} does not match parent {parent!r}.")
            return match["project"], match["location"]
        if not project_id:
            raise invalid("project_id is required.")
        return project_id, "global"

    def create(self, request: cloudbuild_v1.CreateBuildRequest, context: grpc.ServicerContext):
        project, location = self._project_location(request.project_id, request.parent)
        allowed = self.build_regions
        if location != "global" and allowed is not None and location not in allowed:
            raise failed_precondition(_RESTRICTED_REGION_MESSAGE)
        build = cloudbuild_v1.Build(request.build)
        if not build.steps:
            raise invalid("invalid build: a build must have at least one step.")
        _check_steps(build.steps)
        # The proto comment of Build.service_account: "Must be of the format
        # projects/{PROJECT_ID}/serviceAccounts/{ACCOUNT}"; a bare email is refused.
        if build.service_account and not _SERVICE_ACCOUNT.match(build.service_account):
            raise invalid(
                f"invalid value for 'build.service_account': {build.service_account!r} must be of the form "
                "projects/{PROJECT_ID}/serviceAccounts/{ACCOUNT}"
            )
        storage_source = build.source.storage_source
        if "source" in build and not (storage_source.bucket and storage_source.object_):
            raise invalid("invalid build: only source.storage_source {bucket, object} is supported here.")
        if build.logs_bucket and not build.logs_bucket.startswith("gs://"):
            raise invalid(f"invalid build: logs_bucket {build.logs_bucket!r} must be a gs:// URL.")
        # https://cloud.google.com/build/docs/securing-builds/configure-user-specified-service-accounts:
        # a build with its own service account keeps its logs in a bucket of yours or in Cloud Logging only.
        if build.service_account and not build.logs_bucket and build.options.logging not in _OWN_LOGS:
            raise invalid(
                "invalid argument: if 'build.service_account' is specified, the build must either (a) "
                "specify "
                "'build.logs_bucket', (b) use the REGIONAL_USER_OWNED_BUCKET "
                "build.options.default_logs_bucket_behavior option, or (c) use either CLOUD_LOGGING_ONLY / "
                "NONE logging options"
            )
        build.id = str(uuid.uuid4())
        build.name = f"projects/{project}/locations/{location}/builds/{build.id}"
        build.project_id = project
        resolved(build)
        number = project_number(project)
        build.status = Status.QUEUED
        build.create_time = utc_now()
        if "timeout" not in build:
            # The proto comment of Build.timeout: "Default time is 60 minutes."
            build.timeout = {"seconds": 3600}
        logging_mode = build.options.logging
        if not build.logs_bucket and logging_mode not in (
            cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY,
            cloudbuild_v1.BuildOptions.LoggingMode.NONE,
        ):
            build.logs_bucket = f"gs://{number}.cloudbuild-logs.googleusercontent.com"
        build.log_url = f"https://console.cloud.google.com/cloud-build/builds;region={location}/{build.id}?project={number}"
        operation = f"projects/{project}/locations/{location}/operations/{uuid.uuid4()}"
        published = self._save(build, operation, by_runner=False)
        thread = threading.Thread(target=self._run, args=(build.id,), name=f"build-{build.id}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return operations_pb2.Operation(name=operation, metadata=published.metadata)

    def _lookup(self, project_id: str, build_id: str, name: str) -> cloudbuild_v1.Build:
        if name:
            match = BUILD_NAME.match(name)
            if not match:
                raise invalid(f"Invalid build name {name!r}: expected projects/P/locations/L/builds/ID.")
            project_id, build_id = match["project"], match["id"]
        if not project_id or not build_id:
            raise invalid("project_id and id (or name) are required.")
        stored = self.state.table("builds").get(build_id)
        if stored is None or stored["project"] != project_id:
            raise not_found(f"Build {build_id}")
        return self._load(build_id)[0]

    def get(self, request: cloudbuild_v1.GetBuildRequest, context: grpc.ServicerContext):
        return self._lookup(request.project_id, request.id, request.name)

    def list(self, request: cloudbuild_v1.ListBuildsRequest, context: grpc.ServicerContext):
        project, _ = self._project_location(request.project_id, request.parent)
        wanted = []
        for comparison in parse_filter(request.filter):
            if comparison.path not in _LIST_FIELDS or comparison.op not in ("=", "!="):
                raise invalid(
                    f"Unsupported filter expression {comparison.text!r}: the emulator supports = and != on "
                    "status, id, tags and images, joined by AND."
                )
            wanted.append(comparison)
        builds = []
        for build_id, stored in list(self.state.table("builds").items()):
            if stored["project"] != project:
                continue
            build = self._load(build_id)[0]
            if request.parent and not build.name.startswith(f"{request.parent}/"):
                continue
            fields = {
                ("status",): [build.status.name],
                ("id",): [build.id],
                ("tags",): list(build.tags),
                ("images",): list(build.images),
            }
            if all((c.value in fields[c.path]) == (c.op == "=") for c in wanted):
                builds.append(build)
        builds.sort(key=lambda b: b.create_time, reverse=True)
        try:
            offset = int(base64.urlsafe_b64decode(request.page_token).decode()) if request.page_token else 0
        except ValueError:
            raise invalid(f"Invalid page_token {request.page_token!r}.") from None
        size = request.page_size or _DEFAULT_PAGE_SIZE
        more = offset + size < len(builds)
        return cloudbuild_v1.ListBuildsResponse(
            builds=builds[offset : offset + size],
            next_page_token=base64.urlsafe_b64encode(str(offset + size).encode()).decode() if more else "",
        )

    def cancel(self, request: cloudbuild_v1.CancelBuildRequest, context: grpc.ServicerContext):
        build = self._lookup(request.project_id, request.id, request.name)
        with self.state.transaction():
            build, operation = self._load(build.id)
            if build.status not in _RUNNING:
                raise failed_precondition(
                    f"Build {build.id} is already {build.status.name}; only a queued or running build can be "
                    "cancelled."
                )
            build.status = Status.CANCELLED
            build.finish_time = utc_now()
            self._save(build, operation, by_runner=False)
        return build

    def shutdown(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)

    # ---- running a build ------------------------------------------------------------------------------

    def _run(self, build_id: str) -> None:
        build, operation = self._load(build_id)
        run = BuildRun(
            resolved(build),
            access=self.access,
            storage=self.storage,
            registry=self.registry,
            logging=self.logging,
            image_dir=self.image_dir,
            stopped=lambda: self._stopping.is_set() or self._cancelled(build_id),
            pause_s=self.line_pause_s,
        )
        try:
            time.sleep(self.line_pause_s)
            build.status = Status.WORKING
            build.start_time = utc_now()
            self._save(build, operation)
            try:
                run.execute(build, lambda: self._save(build, operation))
                build.status = Status.SUCCESS
            except BuildFailed as failure:
                run.step_label = "MAIN"
                run.log(f"ERROR: {failure.detail}")
                build.status = Status.FAILURE
                build.status_detail = failure.detail
                build.failure_info = {"type_": failure.failure_type, "detail": failure.detail}
            build.finish_time = utc_now()
            self._save(build, operation)
        except BuildStopped:
            return
        except Exception:
            # An emulator bug must not leave the build running forever; the traceback still reaches stderr.
            build.status = Status.INTERNAL_ERROR
            build.status_detail = "The emulator failed while running this build; see its stderr."
            build.finish_time = utc_now()
            self._save(build, operation, by_runner=False)
            raise

    def _cancelled(self, build_id: str) -> bool:
        return self.state.table("builds")[build_id]["status"] == Status.CANCELLED.name

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        cb = cloudbuild_v1
        return service_handler(
            "google.devtools.cloudbuild.v1.CloudBuild",
            [
                Method("CreateBuild", self.create, cb.CreateBuildRequest, operations_pb2.Operation),
                Method("GetBuild", self.get, cb.GetBuildRequest, cb.Build),
                Method("ListBuilds", self.list, cb.ListBuildsRequest, cb.ListBuildsResponse),
                Method("CancelBuild", self.cancel, cb.CancelBuildRequest, cb.Build),
            ],
            hub,
        )
