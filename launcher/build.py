"""Source archive (launcher/build_context.py) -> Cloud Storage -> Cloud Build -> Artifact Registry, with
the build log streamed.

The image is tagged with a hash of the source archive, so an unchanged tree is never rebuilt: the
registry is asked first, and only a missing tag uploads the archive and starts a build from
cloudbuild.yaml (the same file `gcloud builds submit --config cloudbuild.yaml` runs).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.api_core import exceptions
from google.cloud import artifactregistry_v1
from google.cloud.devtools import cloudbuild_v1
from google.cloud.logging_v2.types import LogEntry
from google.protobuf import json_format

from launcher import logs
from launcher.build_context import SourceArchive, pack_source
from launcher.changes import Change
from launcher.cloud import GRANT_PROPAGATION_S, GRANTED, RETRY, Clients
from launcher.cloud_errors import explained
from launcher.errors import UserError
from launcher.settings import Settings

CONFIG_FILE = "cloudbuild.yaml"
SOURCE_PREFIX = "source/"
TAG_LENGTH = 16

RUNNING = {
    cloudbuild_v1.Build.Status.PENDING,
    cloudbuild_v1.Build.Status.QUEUED,
    cloudbuild_v1.Build.Status.WORKING,
}
# Each build carries this tag plus the source's content tag, so a build of the same source can be found.
SOURCE_TAG_PREFIX = "gemma-launch-source-"
FAILED = {
    cloudbuild_v1.Build.Status.FAILURE,
    cloudbuild_v1.Build.Status.INTERNAL_ERROR,
    cloudbuild_v1.Build.Status.TIMEOUT,
    cloudbuild_v1.Build.Status.CANCELLED,
    cloudbuild_v1.Build.Status.EXPIRED,
}
TAIL_LINES = 20
# Each poll of the build's log is a ListLogEntries call, and Cloud Logging allows 60 a minute per project,
# shared with every other reader of its logs (launcher/logs.py). The first ten polls come a second apart,
# so that a short build's lines show at once, the rest 5 s apart: 20 reads in the first minute, 12 in
# each after, however long the build, in the emulator as on Google.
FAST_POLLS = 10
FAST_POLL_S = 1.0
STEADY_POLL_S = 5.0
DRAIN_POLLS = 5
# A build may sit in the queue before its own timeout starts counting.
QUEUE_ALLOWANCE_S = 3600


@dataclass(frozen=True)
class BuiltImage:
    uri: str  # REGION-docker.pkg.dev/PROJECT/REPO/IMAGE@sha256:... (IMAGE:TAG when not built yet)
    tag: str
    change: Change  # kind "image": created | unchanged | would create, with the gcloud command


# ---- cloudbuild.yaml ---------------------------------------------------------------------------


def load_build_config(path: Path) -> cloudbuild_v1.Build:
    """cloudbuild.yaml as a Build; camelCase and snake_case keys both work, as with gcloud."""
    if not path.is_file():
        raise UserError(
            f"{path} does not exist.",
            "gemma-launch builds the image with the cloudbuild.yaml of the project directory.",
        )
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}", "Fix the line named.") from error
    if not isinstance(document, dict):
        raise UserError(f"{path} is not a build config (a mapping with steps).", "Restore cloudbuild.yaml.")
    try:
        build = cloudbuild_v1.Build.from_json(json.dumps(document))
    except json_format.ParseError as error:
        raise UserError(f"{path} is not a valid build config: {error}", "Fix the field named.") from error
    if not build.steps:
        raise UserError(f"{path} has no steps.", "Restore cloudbuild.yaml.")
    return build


# ---- the build ---------------------------------------------------------------------------------


def _tagged_image(clients: Clients, settings: Settings, tag: str) -> artifactregistry_v1.DockerImage | None:
    """The image of settings.image carrying `tag`, if any (NotFound when there is no repository)."""
    prefix = settings.image_repository_uri + "@"
    for image in clients.registry.list_docker_images(
        request=artifactregistry_v1.ListDockerImagesRequest(parent=settings.repository_name), retry=RETRY
    ):
        if image.uri.startswith(prefix) and tag in image.tags:
            return image
    return None


def _upload(clients: Clients, settings: Settings, archive: SourceArchive) -> tuple[str, int]:
    """The archive at gs://BUCKET/source/SHA256.tar.gz (uploaded only if missing): (object, generation)."""
    name = f"{SOURCE_PREFIX}{archive.sha256}.tar.gz"
    bucket = clients.storage.bucket(settings.bucket)
    try:
        blob = bucket.get_blob(name, retry=RETRY)
    except exceptions.NotFound:
        raise UserError(
            f"Bucket gs://{settings.bucket} does not exist.", "Run `gemma-launch up`: it creates it first."
        ) from None
    if blob is None or blob.size != archive.bytes:
        blob = bucket.blob(name)
        # The name is the content's hash, so a retried upload writes the same bytes again.
        blob.upload_from_filename(str(archive.path), content_type="application/gzip", retry=RETRY)
    return name, blob.generation or 0


def _render(entry: LogEntry) -> str:
    text = entry.text_payload
    if not text and entry.json_payload:
        text = str(entry.json_payload.get("message", ""))
    text = text.rstrip("\n")
    # Cloud Build labels each line with its step ('Step #1 - "build"', or MAIN between steps); show
    # the step as gcloud does, unless the text already starts with it.
    step = entry.labels.get("build_step", "MAIN")
    return f"{step}: {text}" if step != "MAIN" and not text.startswith(step) else text


def _log_url(build: cloudbuild_v1.Build, settings: Settings) -> str:
    return build.log_url or (
        f"https://console.cloud.google.com/cloud-build/builds;region={settings.build_location}/{build.id}"
        f"?project={settings.project_id}"
    )


def _console_log(clients: Clients, build: cloudbuild_v1.Build, settings: Settings) -> str | None:
    """The build's log page in the Cloud Console; None in the emulator, whose builds are on no console."""
    return None if clients.emulator else _log_url(build, settings)


def _build_request(
    settings: Settings, config: Path, source: tuple[str, int], tag: str
) -> cloudbuild_v1.CreateBuildRequest:
    build = load_build_config(config)
    name, generation = source
    build.source = cloudbuild_v1.Source(
        storage_source=cloudbuild_v1.StorageSource(
            bucket=settings.bucket, object_=name, generation=generation
        )
    )
    # Only names go here: substitutions are readable by anyone who can list builds.
    build.substitutions.update({"_IMAGE": settings.image_repository_uri, "_TAG": tag})
    build.tags.append(f"{SOURCE_TAG_PREFIX}{tag}")
    # The build runs as the account `up` made for it (read the source, push to the repository, write
    # logs), not the Compute Engine default account, which new organisations leave without roles.
    build.service_account = (
        f"projects/{settings.project_id}/serviceAccounts/{settings.build_service_account_email}"
    )
    # A build with its own account must keep its logs in Cloud Logging only (or in a logs bucket):
    # https://cloud.google.com/build/docs/securing-builds/configure-user-specified-service-accounts
    build.options.logging = cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY
    return cloudbuild_v1.CreateBuildRequest(
        parent=settings.build_parent, project_id=settings.project_id, build=build
    )


def poll_intervals() -> Iterator[float]:
    """The pauses between polls of a build's log, one after another."""
    yield from itertools.repeat(FAST_POLL_S, FAST_POLLS)
    yield from itertools.repeat(STEADY_POLL_S)


def _run_build(
    clients: Clients,
    settings: Settings,
    request: cloudbuild_v1.CreateBuildRequest,
    on_line: Callable[[str], None],
    on_steps: Callable[[list[str]], None] | None = None,
) -> cloudbuild_v1.Build:
    started = _start(clients, settings, request)
    page = _console_log(clients, started, settings)
    on_line(f"Cloud Build {started.id} started" + (f"; log: {page}" if page else ""))
    if on_steps is not None:
        on_steps([step.id or step.name for step in request.build.steps])
    log = logs.Reader(
        clients, settings.project_id, f'resource.type="build" AND resource.labels.build_id="{started.id}"'
    )
    last: deque[str] = deque(maxlen=TAIL_LINES)

    def show(lines: list[str]) -> bool:
        for line in lines:
            last.append(line)
            on_line(line)
        return bool(lines)

    pauses = poll_intervals()
    deadline = time.monotonic() + request.build.timeout.total_seconds() + QUEUE_ALLOWANCE_S
    while (build := _get_build(clients, settings, started.id)).status in RUNNING:
        show([_render(entry) for entry in log.poll()])
        if time.monotonic() > deadline:
            raise UserError(
                f"Cloud Build {started.id} is still running after its timeout.",
                (f"Follow it at {page}; run" if page else "Run") + " `gemma-launch up` again once it ends.",
            )
        time.sleep(next(pauses))
    # Entries can reach Logging after the build ends: read until a poll brings nothing new.
    for _ in range(DRAIN_POLLS):
        if not show([_render(entry) for entry in log.poll()]):
            break
        time.sleep(next(pauses))
    if build.status in FAILED:
        detail = build.failure_info.detail or build.status_detail or "no detail given"
        tail = "\n".join(f"  {line}" for line in last) or "  (no log lines)"
        raise BuildFailed(
            build,
            f"Cloud Build {build.id} ended with {build.status.name}: {detail}\nLast log lines:\n{tail}",
            (f"Full log: {page} . " if page else "")
            + _failure_hint(build, settings)
            + ("" if page else " `gemma-launch up --verbose` shows the whole log as the build runs."),
        )
    return build


class BuildFailed(UserError):
    def __init__(self, build: cloudbuild_v1.Build, message: str, hint: str) -> None:
        super().__init__(message, hint)
        self.build = build


# A build refused these by its account's missing roles fails as one of these types.
_ACCESS_FAILURES = (
    cloudbuild_v1.Build.FailureInfo.FailureType.FETCH_SOURCE_FAILED,
    cloudbuild_v1.Build.FailureInfo.FailureType.PUSH_FAILED,
)
# Between builds refused for roles `up` granted moments ago: Google's advice is to retry with backoff.
FIRST_REBUILD_PAUSE_S = 2.0
MAX_REBUILD_PAUSE_S = 30.0


def _run_build_once_granted(
    clients: Clients,
    settings: Settings,
    request: cloudbuild_v1.CreateBuildRequest,
    on_line: Callable[[str], None],
    on_steps: Callable[[list[str]], None] | None = None,
) -> cloudbuild_v1.Build:
    """The build, started again while it fails to read the source or push the image for want of the
    roles this process granted its account moments ago, which can take minutes to be in effect
    (cloud.GRANT_PROPAGATION_S); a build that fails otherwise, or later, is reported at once."""
    account = settings.build_service_account_email
    pause = FIRST_REBUILD_PAUSE_S
    while True:
        try:
            return _run_build(clients, settings, request, on_line, on_steps)
        except BuildFailed as failed:
            if failed.build.failure_info.type_ not in _ACCESS_FAILURES or account not in GRANTED:
                raise
            failure = failed.build.failure_info.type_
            what = "read the source" if failure == _ACCESS_FAILURES[0] else "push the image"
            on_line(
                f"Cloud Build {failed.build.id} could not {what}: its account {account} was granted its "
                f"roles moments ago, and Google takes a few minutes to put a new role in effect. Building "
                f"again in {pause:g} s."
            )
        time.sleep(pause)
        pause = min(pause * 2, MAX_REBUILD_PAUSE_S)


def _failure_hint(build: cloudbuild_v1.Build, settings: Settings) -> str:
    """Source fetch and push failures are about the build's account, not the Dockerfile."""
    kind = build.failure_info.type_
    account = settings.build_service_account_email
    # A role granted in the last minutes may not be in effect yet
    # (https://cloud.google.com/iam/docs/access-change-propagation).
    late = f"A role granted in the last {GRANT_PROPAGATION_S / 60:g} minutes may not be in effect yet."
    if kind == cloudbuild_v1.Build.FailureInfo.FailureType.FETCH_SOURCE_FAILED:
        return (
            f"The build's account {account} could not read the source archive: run `gemma-launch up` "
            f"again, which grants it roles/storage.objectViewer on gs://{settings.bucket}. {late}"
        )
    if kind == cloudbuild_v1.Build.FailureInfo.FailureType.PUSH_FAILED:
        return (
            f"The build's account {account} could not push the image: run `gemma-launch up` again, which "
            f"grants it roles/artifactregistry.writer on {settings.repository}. {late}"
        )
    return "Fix the Dockerfile, its .dockerignore or the source, then run `gemma-launch up` again."


def _start(
    clients: Clients, settings: Settings, request: cloudbuild_v1.CreateBuildRequest
) -> cloudbuild_v1.Build:
    """A build of this source: one already queued, running or done (our own create whose reply was
    lost, or another `up`'s) is joined rather than started again, so each source is built once."""
    (label,) = [tag for tag in request.build.tags if tag.startswith(SOURCE_TAG_PREFIX)]

    def live() -> list[cloudbuild_v1.Build]:
        """Builds of this source that are queued, running or done, oldest first."""
        found = clients.builds.list_builds(
            request=cloudbuild_v1.ListBuildsRequest(
                parent=settings.build_parent, project_id=settings.project_id, filter=f'tags="{label}"'
            ),
            retry=RETRY,
        )
        # A finished build counts only while the image it pushed is there: after `down` deleted the
        # repository, the same source is built again rather than joined to a build of a deleted image.
        done = [b for b in found if b.status == cloudbuild_v1.Build.Status.SUCCESS]
        if done and _tagged_image(clients, settings, request.build.substitutions["_TAG"]) is None:
            done = []
        alive = [b for b in found if b.status in RUNNING] + done
        return sorted(alive, key=lambda build: (build.create_time, build.id))

    def start() -> cloudbuild_v1.Build:
        running = live()
        if running:
            return running[0]
        try:
            ours = clients.builds.create_build(request=request, retry=None).metadata.build
        except exceptions.FailedPrecondition as error:
            if settings.build_location == "global":
                raise
            # Some projects may only build in a few regions, and are told so this way; global always
            # works (https://cloud.google.com/build/docs/locations#restricted_regions_for_some_projects).
            raise UserError(
                f"Cloud Build refused to build in {settings.build_location}: {error.message}",
                'Use --build-location global (or build_location = "global" in gemma-launch.toml); the image '
                f"still goes to the repository in {settings.region}.",
            ) from error
        # Two `up`s can both find none and both create: the younger build gives way to the older.
        oldest = (live() or [ours])[0]
        if oldest.id != ours.id:
            clients.builds.cancel_build(
                request=cloudbuild_v1.CancelBuildRequest(
                    name=f"{settings.build_parent}/builds/{ours.id}",
                    project_id=settings.project_id,
                    id=ours.id,
                ),
                retry=RETRY,
            )
        return oldest

    return RETRY(start)()


def _get_build(clients: Clients, settings: Settings, build_id: str) -> cloudbuild_v1.Build:
    return clients.builds.get_build(
        request=cloudbuild_v1.GetBuildRequest(
            name=f"{settings.build_parent}/builds/{build_id}", project_id=settings.project_id, id=build_id
        ),
        retry=RETRY,
    )


def _pushed_uri(build: cloudbuild_v1.Build, settings: Settings, tag: str) -> str:
    wanted = f"{settings.image_repository_uri}:{tag}"
    for image in build.results.images:
        if image.name == wanted and image.digest:
            return f"{settings.image_repository_uri}@{image.digest}"
    raise UserError(
        f"Cloud Build {build.id} succeeded but did not push {wanted}.",
        "cloudbuild.yaml must list ${_IMAGE}:${_TAG} under images.",
    )


def build_image(
    clients: Clients,
    settings: Settings,
    root: Path,
    *,
    on_line: Callable[[str], None] = print,
    dry_run: bool = False,
    config: Path | None = None,
    on_steps: Callable[[list[str]], None] | None = None,
) -> BuiltImage:
    """The image of `root`'s source in the repository, built only when its content tag is missing.

    `on_line` receives the build's log lines as they arrive (the first names the build and where its
    log is); `on_steps`, once the build has started, the ids of its steps (Cloud Build logs each as
    'Step #N - "id"'). A failed build raises UserError with its last log lines and the log URL.
    """
    root = root.resolve()
    config = config or root / CONFIG_FILE
    load_build_config(config)
    token = settings.hf_token.get_secret_value() if settings.hf_token else ""
    archive = pack_source(root, forbidden=[token])
    try:
        tag = archive.sha256[:TAG_LENGTH]
        command = (
            f"gcloud builds submit {root} --config={config} --region={settings.build_location} "
            f"--project={settings.project_id} "
            f"--substitutions=_IMAGE={settings.image_repository_uri},_TAG={tag}"
        )
        with explained("image", settings.image_repository_uri, settings):
            try:
                existing = _tagged_image(clients, settings, tag)
            except exceptions.NotFound:
                if not dry_run:
                    raise UserError(
                        f"Artifact Registry repository {settings.repository_name} does not exist.",
                        "Run `gemma-launch up`: it creates the repository before building.",
                    ) from None
                existing = None
        if existing is not None:
            return BuiltImage(existing.uri, tag, Change("image", existing.uri, "unchanged"))
        if dry_run:
            planned = f"{settings.image_repository_uri}:{tag}"
            return BuiltImage(planned, tag, Change("image", planned, "would create", command))
        with explained("source archive", f"gs://{settings.bucket}/{SOURCE_PREFIX}", settings):
            source = _upload(clients, settings, archive)
        with explained("build", settings.image_repository_uri, settings):
            request = _build_request(settings, config, source, tag)
            build = _run_build_once_granted(clients, settings, request, on_line, on_steps)
        uri = _pushed_uri(build, settings, tag)
        return BuiltImage(uri, tag, Change("image", uri, "created", command))
    finally:
        archive.path.unlink(missing_ok=True)
