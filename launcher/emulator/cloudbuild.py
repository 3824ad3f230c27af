"""Cloud Build v1: CreateBuild (long-running), GetBuild, ListBuilds, CancelBuild.

There is no Docker engine here. A build fetches its source archive from the storage emulator's files,
and each `gcr.io/cloud-builders/docker` step is understood: `build` checks the archive and its
Dockerfile (see dockerfile.py; COPY and ADD see the context less what its .dockerignore
excludes, see dockerignore.py) and snapshots the archive as the image's filesystem, `push` records the
image in Artifact Registry. Other builder images are logged as simulated. The image digest is the
archive's sha256, so the same source always yields the same image.

Builds run in a background thread through QUEUED -> WORKING -> SUCCESS / FAILURE / CANCELLED, writing
their log lines to the Logging emulator with short pauses, so clients can stream them as they happen.
The build's operation stays not-done until the build ends.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import sys
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
from google.cloud.devtools import cloudbuild_v1
from google.longrunning import operations_pb2
from google.rpc import status_pb2

from launcher.emulator import dockerfile, dockerignore
from launcher.emulator.access import Access, compute_default_account, project_number
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.logging import Logging, parse_filter
from launcher.emulator.rpc import (
    ApiError,
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
from launcher.settings import RESTRICTED_BUILD_REGIONS

Status = cloudbuild_v1.Build.Status
FailureType = cloudbuild_v1.Build.FailureInfo.FailureType
_RUNNING = (Status.PENDING, Status.QUEUED, Status.WORKING)
_DOCKER_BUILDER = re.compile(r"^gcr\.io/cloud-builders/docker(?::[\w.-]+)?$")
_AR_IMAGE = re.compile(
    r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/"
    r"(?P<image>[^:@]+?)(?::(?P<tag>[^:@/]+))?$"
)
_PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)$")
_BUILD_NAME = re.compile(r"^projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/builds/(?P<id>[^/]+)$")
_SUBSTITUTION_KEY = re.compile(r"^_[A-Z0-9_]+$")
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")
_BUILT_INS = [
    "PROJECT_ID",
    "BUILD_ID",
    "PROJECT_NUMBER",
    "LOCATION",
    "TRIGGER_NAME",
    "COMMIT_SHA",
    "REVISION_ID",
    "SHORT_SHA",
    "REPO_NAME",
    "REPO_FULL_NAME",
    "BRANCH_NAME",
    "TAG_NAME",
    "REF_NAME",
    "TRIGGER_BUILD_CONFIG_PATH",
    "SERVICE_ACCOUNT_EMAIL",
    "SERVICE_ACCOUNT",
]
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
_LIST_FIELDS = (("status",), ("id",), ("tags",), ("images",))
# How an ended build's operation fails (google.rpc.Code, message), as the service reports it.
_OPERATION_ERRORS = {
    Status.FAILURE: (2, "Build failed; check build logs for details"),
    Status.INTERNAL_ERROR: (13, "Build failed with an internal error"),
    Status.CANCELLED: (1, "Build was cancelled"),
}


class _Failed(Exception):
    def __init__(self, failure_type: FailureType, detail: str) -> None:
        super().__init__(detail)
        self.failure_type = failure_type
        self.detail = detail


class _Stopped(Exception):
    """The build was cancelled, or the emulator is shutting down: stop without touching the build."""


def _now() -> datetime:
    return datetime.now(UTC)


def _normal_tag(name: str) -> str:
    """An image reference as docker stores it: no tag means :latest."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in name else f"{name}:latest"


def _substitute(text: str, values: dict[str, str], used: set[str], loose: bool) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        key = match[1] or match[2]
        if key in values:
            used.add(key)
            return values[key]
        if loose:
            return ""
        if key.startswith("_"):
            raise invalid(
                f"invalid value for 'build.substitutions': key in the template {key!r} is not matched in the "
                "substitution data"
            )
        raise invalid(
            f"invalid value for 'build.substitutions': key in the template {key!r} is not a valid built-in "
            "substitution"
        )

    return _REFERENCE.sub(replace, text)


def _resolved(build: cloudbuild_v1.Build) -> cloudbuild_v1.Build:
    """The build with its substitutions applied, validated as CreateBuild validates them."""
    for key in build.substitutions:
        if key not in _BUILT_INS and not _SUBSTITUTION_KEY.match(key):
            raise invalid(
                f"invalid value for 'build.substitutions': substitution key {key!r} does not respect format "
                "'^_[A-Z0-9_]+$'"
            )
    location = _BUILD_NAME.match(build.name)
    assert location
    values = {key: "" for key in _BUILT_INS}
    values.update(
        PROJECT_ID=build.project_id,
        BUILD_ID=build.id,
        PROJECT_NUMBER=project_number(build.project_id),
        LOCATION=location["location"],
    )
    values.update(build.substitutions)
    loose = build.options.substitution_option == cloudbuild_v1.BuildOptions.SubstitutionOption.ALLOW_LOOSE
    used: set[str] = set()
    resolved = cloudbuild_v1.Build(build)

    def sub(text: str) -> str:
        return _substitute(text, values, used, loose)

    for step in resolved.steps:
        step.name = sub(step.name)
        step.args = [sub(arg) for arg in step.args]
        step.env = [sub(env) for env in step.env]
        step.dir_ = sub(step.dir_)
        step.entrypoint = sub(step.entrypoint)
    resolved.images = [sub(image) for image in resolved.images]
    unused = sorted(set(build.substitutions) - used)
    if unused and not loose:
        raise invalid(
            f"invalid value for 'build.substitutions': key {unused[0]!r} in the substitution data is not "
            "matched in the template"
        )
    return resolved


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
                raise _Stopped
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
                build.finish_time = _now()
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
        for index, step in enumerate(build.steps):
            if not step.name:
                raise invalid(f"invalid build: steps[{index}].name (the builder image) must be set.")
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
        _resolved(build)
        number = project_number(project)
        build.status = Status.QUEUED
        build.create_time = _now()
        if "timeout" not in build:
            build.timeout = {"seconds": 600}
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
            match = _BUILD_NAME.match(name)
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
            build.finish_time = _now()
            self._save(build, operation, by_runner=False)
        return build

    def shutdown(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)

    # ---- running a build ------------------------------------------------------------------------------

    def _run(self, build_id: str) -> None:
        build, operation = self._load(build_id)
        run = _BuildRun(self, _resolved(build))
        try:
            time.sleep(self.line_pause_s)
            build.status = Status.WORKING
            build.start_time = _now()
            self._save(build, operation)
            try:
                run.execute(build, lambda: self._save(build, operation))
                build.status = Status.SUCCESS
            except _Failed as failure:
                run.step_label = "MAIN"
                run.log(f"ERROR: {failure.detail}")
                build.status = Status.FAILURE
                build.status_detail = failure.detail
                build.failure_info = {"type_": failure.failure_type, "detail": failure.detail}
            build.finish_time = _now()
            self._save(build, operation)
        except _Stopped:
            return
        except Exception:
            # An emulator bug must not leave the build running forever; the traceback still reaches stderr.
            build.status = Status.INTERNAL_ERROR
            build.status_detail = "The emulator failed while running this build; see its stderr."
            build.finish_time = _now()
            self._save(build, operation, by_runner=False)
            raise

    def _cancelled(self, build_id: str) -> bool:
        return self.state.table("builds")[build_id]["status"] == Status.CANCELLED.name

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        cb = cloudbuild_v1
        return service_handler(
            "google.devtools.cloudbuild.v1.CloudBuild",
            [
                Method(
                    "CreateBuild", self.create, cb.CreateBuildRequest, operations_pb2.Operation, mutating=True
                ),
                Method("GetBuild", self.get, cb.GetBuildRequest, cb.Build),
                Method("ListBuilds", self.list, cb.ListBuildsRequest, cb.ListBuildsResponse),
                Method("CancelBuild", self.cancel, cb.CancelBuildRequest, cb.Build, mutating=True),
            ],
            hub,
        )


class _BuildRun:
    """One build's execution, as its service account: its source, the images its steps built, its log.

    A build runs as `build.service_account`, else as the Compute Engine default account, which projects
    in organisations created after May 2024 leave without roles
    (https://cloud.google.com/build/docs/cloud-build-service-account-updates): reading the source needs
    storage.objects.get, pushing artifactregistry.repositories.uploadArtifacts, and its log lines reach
    Cloud Logging only with logging.logEntries.create.
    """

    def __init__(self, service: CloudBuild, build: cloudbuild_v1.Build) -> None:
        self.service = service
        self.build = build
        self.project = build.project_id
        account = build.service_account.rsplit("/", 1)[-1] or compute_default_account(self.project)
        self.account = account
        self.member = f"serviceAccount:{account}"
        self.access = service.access
        self.may_log = self.access.allowed(
            self.member, "logging.logEntries.create", self.project, f"projects/{self.project}"
        )
        self.step_label = "MAIN"
        self.archive = b""
        self.members: dict[str, tarfile.TarInfo] = {}
        # Local tags (as docker stores them) -> digest of the image built under that tag.
        self.built: dict[str, str] = {}
        self.logging = service.logging

    def log(self, text: str) -> None:
        if self.service._stopping.is_set() or self.service._cancelled(self.build.id):
            raise _Stopped
        if not self.may_log:
            return
        self.logging.append(
            f"projects/{self.project}/logs/cloudbuild",
            "build",
            {
                "build_id": self.build.id,
                "build_trigger_id": self.build.build_trigger_id,
                "project_id": self.project,
            },
            text,
            labels={"build_step": self.step_label},
            severity="INFO",
        )
        time.sleep(self.service.line_pause_s)

    def execute(self, build: cloudbuild_v1.Build, save: Callable[[], object]) -> None:
        """Run every step, then push `images`; `build` (the stored form) gets statuses and results."""
        self.log(f'starting build "{self.build.id}"')
        self.fetch_source()
        self.log("BUILD")
        step_images = []
        for index, step in enumerate(self.build.steps):
            label = f'Step #{index} - "{step.id}"' if step.id else f"Step #{index}"
            build.steps[index].status = Status.WORKING
            build.steps[index].timing = {"start_time": _now()}
            save()
            self.step_label = "MAIN"
            self.log(f"Starting {label}")
            self.step_label = label
            try:
                step_images.append(self.step(index, step))
            except _Failed:
                build.steps[index].status = Status.FAILURE
                build.steps[index].exit_code = 1
                raise
            finally:
                build.steps[index].timing.end_time = _now()
            build.steps[index].status = Status.SUCCESS
            self.step_label = "MAIN"
            self.log(f"Finished {label}")
            save()
        build.results.build_step_images = step_images
        build.results.build_step_outputs = [b""] * len(step_images)
        build.results.images = self.push_images()
        self.log("DONE")

    def fetch_source(self) -> None:
        source = self.build.source.storage_source
        if not source.bucket:
            return
        self.log("FETCHSOURCE")
        url = f"gs://{source.bucket}/{source.object_}"
        self.log(f"Fetching storage object: {url}" + (f"#{source.generation}" if source.generation else ""))
        if not self.access.allowed(
            self.member, "storage.objects.get", self.project, f"projects/_/buckets/{source.bucket}"
        ):
            raise _Failed(
                FailureType.FETCH_SOURCE_FAILED,
                f"failed to fetch source: {self.account} does not have storage.objects.get access to the "
                f"Google Cloud Storage object {url}. Permission 'storage.objects.get' denied on resource (or "
                "it may not exist).",
            )
        bucket_dir = self.service.storage.bucket_dir(source.bucket)
        path = (bucket_dir / source.object_).resolve()
        if not path.is_relative_to(bucket_dir.resolve()) or not path.is_file():
            raise _Failed(
                FailureType.FETCH_SOURCE_FAILED,
                f"failed to fetch source: storage object {url} was not found (NOT_FOUND).",
            )
        self.archive = path.read_bytes()
        try:
            with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as archive:
                self.members = {dockerfile.normalize(m.name): m for m in archive.getmembers()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise _Failed(
                FailureType.FETCH_SOURCE_FAILED,
                f"failed to unpack source {url}: not a gzipped tar archive ({error})",
            ) from None
        self.log(f"Extracted {url}: {len(self.members)} entries")

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.archive).hexdigest()

    def step(self, index: int, step: cloudbuild_v1.BuildStep) -> str:
        """Run one step; the digest it built, or ''."""
        if not _DOCKER_BUILDER.match(step.name) or step.entrypoint not in ("", "docker"):
            command = " ".join([step.entrypoint or step.name, *step.args])
            self.log(f"{step.name}: {command}")
            self.log("(simulated: the emulator runs no containers; this step is assumed to succeed)")
            return ""
        verb = step.args[0] if step.args else ""
        if verb == "build":
            return self.docker_build(index, step)
        if verb == "push":
            self.docker_push(index, list(step.args[1:]))
            return ""
        self.log(f"docker {' '.join(step.args)}")
        self.log(f"(simulated: the emulator understands docker build and push, not {verb!r})")
        return ""

    def _step_failed(self, index: int, step: cloudbuild_v1.BuildStep, reason: str) -> _Failed:
        self.log(reason)
        return _Failed(
            FailureType.USER_BUILD_STEP,
            f'Build step failure: build step {index} "{step.name}" failed: '
            "step exited with non-zero status: 1",
        )

    def docker_build(self, index: int, step: cloudbuild_v1.BuildStep) -> str:
        args = list(step.args[1:])
        tags: list[str] = []
        cache_from: list[str] = []
        build_args: dict[str, str] = {}
        file = target = None
        contexts = []
        takes_value = {
            "-t",
            "--tag",
            "-f",
            "--file",
            "--cache-from",
            "--build-arg",
            "--target",
            "--network",
            "--platform",
            "--label",
            "--progress",
        }
        while args:
            arg = args.pop(0)
            name, equals, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
            if name in takes_value and not equals:
                if not args:
                    raise self._step_failed(index, step, f"flag needs an argument: {arg}")
                value = args.pop(0)
            if name in ("-t", "--tag"):
                tags.append(_normal_tag(value))
            elif name in ("-f", "--file"):
                file = value
            elif name == "--cache-from":
                cache_from.append(value)
            elif name == "--build-arg":
                key, _, build_value = value.partition("=")
                build_args[key] = build_value
            elif name == "--target":
                target = value
            elif name in takes_value or name in ("--pull", "--no-cache", "-q", "--quiet", "--rm"):
                continue
            elif arg.startswith("-"):
                raise self._step_failed(index, step, f"unknown flag: {arg}")
            else:
                contexts.append(arg)
        if len(contexts) != 1:
            raise self._step_failed(
                index, step, '"docker build" requires exactly 1 argument (the build context).'
            )
        workdir = dockerfile.normalize(step.dir_)
        context = dockerfile.normalize(posixpath.join(workdir, contexts[0]))
        path = dockerfile.normalize(
            posixpath.join(workdir, file) if file else posixpath.join(context, "Dockerfile")
        )
        if not self.archive:
            raise self._step_failed(index, step, "unable to prepare context: the build has no source")
        for image in cache_from:
            found = self.service.registry.find_image(image)
            self.log(
                f"Using cache from {image}"
                if found
                else f"Cache image {image} not found; building without it"
            )
        self.log(f"Sending build context to Docker daemon  {len(self.archive)} bytes")
        member = self.members.get(path)
        if member is None or not member.isfile():
            raise self._step_failed(
                index,
                step,
                f"unable to prepare context: unable to evaluate symlinks in Dockerfile path: {path}: "
                "no such file or directory",
            )
        try:
            parsed = dockerfile.parse(self._text(member), build_args, target)
        except dockerfile.DockerfileError as error:
            raise self._step_failed(index, step, f"Error: {error}") from None
        paths = dockerfile.context_paths(self._readable(context, path))
        total = len(parsed.instructions)
        for number, instruction in enumerate(parsed.instructions, 1):
            self.log(f"Step {number}/{total} : {instruction}")
            missing = [source for source in instruction.sources if not dockerfile.context_has(paths, source)]
            if missing:
                # BuildKit's report of a COPY/ADD source that is missing or excluded by the ignore file,
                # e.g. https://github.com/moby/buildkit/issues/4128 (the checksum ref is BuildKit's own id).
                self.log(f"Dockerfile:{instruction.line}")
                self.log(f"{instruction.line:>4} | >>> {instruction}")
                raise self._step_failed(
                    index,
                    step,
                    "ERROR: failed to solve: failed to compute cache key: failed to calculate checksum of "
                    f'ref {self.build.id}::{self.digest[7:32]}: "/{dockerfile.normalize(missing[0])}": '
                    "not found",
                )
        digest = self.digest
        self._snapshot(digest, parsed.config)
        self.log(f"Successfully built {digest.removeprefix('sha256:')[:12]}")
        for tag in tags:
            self.built[tag] = digest
            self.log(f"Successfully tagged {tag}")
        return digest

    def _text(self, member: tarfile.TarInfo) -> str:
        with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as archive:
            extracted = archive.extractfile(member)
            assert extracted
            return extracted.read().decode("utf-8", errors="replace")

    def _readable(self, context: str, dockerfile_path: str) -> list[str]:
        """The context's paths (relative to it) that COPY and ADD can read, its ignore file applied."""
        files = {name for name, member in self.members.items() if member.isfile()}
        ignore = dockerignore.ignore_file(files, context, dockerfile_path)
        excluder = dockerignore.Excluder(
            dockerignore.patterns(self._text(self.members[ignore])) if ignore else []
        )
        prefix = f"{context}/" if context else ""
        sent = [name.removeprefix(prefix) for name in self.members if name.startswith(prefix)]
        return [name for name in sent if not excluder.excluded(name)]

    def _snapshot(self, digest: str, config: dockerfile.ImageConfig) -> None:
        """Unpack the archive as the image's filesystem, once per digest, and write its config."""
        target = self.service.image_dir(digest)
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = target.parent / f".staging-{uuid.uuid4()}"
            with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as archive:
                archive.extractall(staging, filter="data")
            try:
                os.replace(staging, target)
            except OSError:
                # Another build of the same source unpacked it first.
                shutil.rmtree(staging)
        (target / ".image.json").write_text(json.dumps(config.to_json(), indent=1))

    def _push(self, name: str, digest: str) -> None:
        self.log(f"The push refers to repository [{name.rpartition(':')[0]}]")
        match = _AR_IMAGE.match(name)
        if match is None:
            self.log(f"(simulated: {name} is not an Artifact Registry image; nothing was recorded)")
        else:
            repository = (
                f"projects/{match['project']}/locations/{match['location']}/repositories/{match['repo']}"
            )
            permission = "artifactregistry.repositories.uploadArtifacts"
            if not self.access.allowed(self.member, permission, match["project"], repository):
                message = (
                    f'denied: Permission "{permission}" denied on resource "{repository}" (or it may not '
                    "exist)"
                )
                self.log(f"error pushing {name}: {message}")
                raise _Failed(FailureType.PUSH_FAILED, f"failed to push {name}: {message}")
            try:
                self.service.registry.record_image(
                    repository, match["image"], digest, [match["tag"] or "latest"]
                )
            except ApiError as error:
                self.log(f"error pushing {name}: {error.message}")
                raise _Failed(FailureType.PUSH_FAILED, f"failed to push {name}: {error.message}") from None
        self.log(f"{name.rpartition(':')[2]}: digest: {digest} size: {len(self.archive)}")

    def docker_push(self, index: int, args: list[str]) -> None:
        all_tags = bool({"-a", "--all-tags"} & set(args))
        names = [arg for arg in args if not arg.startswith("-")]
        if len(names) != 1:
            raise self._step_failed(
                index, self.build.steps[index], '"docker push" requires exactly 1 argument.'
            )
        if all_tags:
            pushes = {tag: digest for tag, digest in self.built.items() if tag.rpartition(":")[0] == names[0]}
        else:
            tag = _normal_tag(names[0])
            pushes = {tag: self.built[tag]} if tag in self.built else {}
        if not pushes:
            raise self._step_failed(
                index, self.build.steps[index], f"An image does not exist locally with the tag: {names[0]}"
            )
        for tag, digest in pushes.items():
            self._push(tag, digest)

    def push_images(self) -> list[cloudbuild_v1.BuiltImage]:
        if not self.build.images:
            return []
        self.step_label = "MAIN"
        self.log("PUSH")
        missing = [image for image in self.build.images if _normal_tag(image) not in self.built]
        if missing:
            raise _Failed(
                FailureType.PUSH_IMAGE_NOT_FOUND,
                f"failed to find one or more images after execution of build steps: {missing}",
            )
        results = []
        for image in self.build.images:
            started = _now()
            digest = self.built[_normal_tag(image)]
            self._push(_normal_tag(image), digest)
            results.append(
                cloudbuild_v1.BuiltImage(
                    name=image, digest=digest, push_timing={"start_time": started, "end_time": _now()}
                )
            )
        return results
