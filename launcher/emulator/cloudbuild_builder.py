"""One build's steps, as the emulator carries them out without a Docker engine.

A build fetches its source archive from the storage emulator's files, and each
`gcr.io/cloud-builders/docker` step is understood: `build` checks the archive and its Dockerfile (see
dockerfile.py; COPY and ADD see the context less what its .dockerignore excludes, see dockerignore.py)
and snapshots the archive as the image's filesystem, `push` records the image in Artifact Registry.
Other builder images are logged as simulated. The image digest is the archive's sha256, so the same
source always yields the same image.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import shutil
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from google.cloud.devtools import cloudbuild_v1

from launcher.emulator import dockerfile, dockerignore
from launcher.emulator.access import Access, compute_default_account
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.logging import Logging
from launcher.emulator.rpc import ApiError
from launcher.emulator.storage import CloudStorage

Status = cloudbuild_v1.Build.Status
FailureType = cloudbuild_v1.Build.FailureInfo.FailureType
_DOCKER_BUILDER = re.compile(r"^gcr\.io/cloud-builders/docker(?::[\w.-]+)?$")
_AR_IMAGE = re.compile(
    r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/"
    r"(?P<image>[^:@]+?)(?::(?P<tag>[^:@/]+))?$"
)


class BuildFailed(Exception):
    def __init__(self, failure_type: FailureType, detail: str) -> None:
        super().__init__(detail)
        self.failure_type = failure_type
        self.detail = detail


class BuildStopped(Exception):
    """The build was cancelled, or the emulator is shutting down: stop without touching the build."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _normal_tag(name: str) -> str:
    """An image reference as docker stores it: no tag means :latest."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last or "@" in name else f"{name}:latest"


class BuildRun:
    """One build's execution, as its service account: its source, the images its steps built, its log.

    A build runs as `build.service_account`, else as the Compute Engine default account, which projects
    in organisations created after May 2024 leave without roles
    (https://cloud.google.com/build/docs/cloud-build-service-account-updates): reading the source needs
    storage.objects.get, pushing artifactregistry.repositories.uploadArtifacts, and its log lines reach
    Cloud Logging only with logging.logEntries.create.
    """

    def __init__(
        self,
        build: cloudbuild_v1.Build,
        *,
        access: Access,
        storage: CloudStorage,
        registry: ArtifactRegistry,
        logging: Logging,
        image_dir: Callable[[str], Path],
        stopped: Callable[[], bool],
        pause_s: float,
    ) -> None:
        """`image_dir(digest)` is where an image's filesystem goes; `stopped()` says the build was cancelled
        or the emulator is shutting down; `pause_s` is the pause after each log line."""
        self.build = build
        self.storage = storage
        self.registry = registry
        self.image_dir = image_dir
        self.stopped = stopped
        self.pause_s = pause_s
        self.project = build.project_id
        account = build.service_account.rsplit("/", 1)[-1] or compute_default_account(self.project)
        self.account = account
        self.member = f"serviceAccount:{account}"
        self.access = access
        # A build acts with access tokens of its account: none are issued for one deleted or disabled
        # since the build was created (https://cloud.google.com/iam/docs/reference/rest/v1/
        # projects.serviceAccounts/disable), so it fails at its start and writes no log.
        self.unusable = access.unusable_account(account)
        self.may_log = not self.unusable and self.access.allowed(
            self.member, "logging.logEntries.create", self.project, f"projects/{self.project}"
        )
        self.step_label = "MAIN"
        self.archive = b""
        self.members: dict[str, tarfile.TarInfo] = {}
        # Local tags (as docker stores them) -> digest of the image built under that tag.
        self.built: dict[str, str] = {}
        self.logging = logging

    def log(self, text: str) -> None:
        if self.stopped():
            raise BuildStopped
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
        time.sleep(self.pause_s)

    def execute(self, build: cloudbuild_v1.Build, save: Callable[[], object]) -> None:
        """Run every step, then push `images`; `build` (the stored form) gets statuses and results."""
        self.log(f'starting build "{self.build.id}"')
        if self.unusable:
            raise BuildFailed(
                FailureType.FAILURE_TYPE_UNSPECIFIED,
                f"The build runs as {self.account}, but {self.unusable}: no access token can be issued "
                "for it.",
            )
        self.fetch_source()
        self.log("BUILD")
        step_images = []
        for index, step in enumerate(self.build.steps):
            label = f'Step #{index} - "{step.id}"' if step.id else f"Step #{index}"
            build.steps[index].status = Status.WORKING
            build.steps[index].timing = {"start_time": utc_now()}
            save()
            self.step_label = "MAIN"
            self.log(f"Starting {label}")
            self.step_label = label
            try:
                step_images.append(self.step(index, step))
            except BuildFailed:
                build.steps[index].status = Status.FAILURE
                build.steps[index].exit_code = 1
                raise
            finally:
                build.steps[index].timing.end_time = utc_now()
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
            raise BuildFailed(
                FailureType.FETCH_SOURCE_FAILED,
                f"failed to fetch source: {self.account} does not have storage.objects.get access to the "
                f"Google Cloud Storage object {url}. Permission 'storage.objects.get' denied on resource (or "
                "it may not exist).",
            )
        bucket_dir = self.storage.bucket_dir(source.bucket)
        path = (bucket_dir / source.object_).resolve()
        if not path.is_relative_to(bucket_dir.resolve()) or not path.is_file():
            raise BuildFailed(
                FailureType.FETCH_SOURCE_FAILED,
                f"failed to fetch source: storage object {url} was not found (NOT_FOUND).",
            )
        self.archive = path.read_bytes()
        try:
            with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as archive:
                self.members = {dockerfile.normalize(m.name): m for m in archive.getmembers()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
            raise BuildFailed(
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

    def _step_failed(self, index: int, step: cloudbuild_v1.BuildStep, reason: str) -> BuildFailed:
        self.log(reason)
        return BuildFailed(
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
            found = self.registry.find_image(image)
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
        target = self.image_dir(digest)
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
                raise BuildFailed(FailureType.PUSH_FAILED, f"failed to push {name}: {message}")
            try:
                self.registry.record_image(repository, match["image"], digest, [match["tag"] or "latest"])
            except ApiError as error:
                self.log(f"error pushing {name}: {error.message}")
                message = f"failed to push {name}: {error.message}"
                raise BuildFailed(FailureType.PUSH_FAILED, message) from None
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
            raise BuildFailed(
                FailureType.PUSH_IMAGE_NOT_FOUND,
                f"failed to find one or more images after execution of build steps: {missing}",
            )
        results = []
        for image in self.build.images:
            started = utc_now()
            digest = self.built[_normal_tag(image)]
            self._push(_normal_tag(image), digest)
            results.append(
                cloudbuild_v1.BuiltImage(
                    name=image, digest=digest, push_timing={"start_time": started, "end_time": utc_now()}
                )
            )
        return results
