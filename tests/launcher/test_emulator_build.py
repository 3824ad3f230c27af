import hashlib
import io
import json
import tarfile

import pytest
from google.api_core import exceptions, retry
from google.api_core.future.polling import POLLING_PREDICATE
from google.cloud import artifactregistry_v1
from google.cloud.devtools import cloudbuild_v1

from launcher.cloud import Clients
from launcher.cloud_errors import translate
from launcher.emulator import dockerfile, dockerignore
from launcher.emulator.access import DEFAULT_ENABLED
from launcher.emulator.server import Emulator

PROJECT = "demo-project"
REGION = "europe-west4"
BUCKET = "demo-project-sources"
REPOSITORY = f"projects/{PROJECT}/locations/{REGION}/repositories/images"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/images/trainer"
Status = cloudbuild_v1.Build.Status
FailureType = cloudbuild_v1.Build.FailureInfo.FailureType
# The client's default polling waits a second or more between polls; the emulated builds take less.
FAST = retry.Retry(predicate=POLLING_PREDICATE, initial=0.05, maximum=0.2, multiplier=1.5, timeout=30)

GOOD_DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM python:3.11-slim AS base
ARG APP=/app
ENV PYTHONUNBUFFERED=1 \\
    PATH=/app/.venv/bin:$PATH
WORKDIR $APP
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY trainer/ ./trainer/
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
"""


def archive(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def source(dockerfile_text: str = GOOD_DOCKERFILE, **extra: str) -> dict[str, str]:
    return {
        "Dockerfile": dockerfile_text,
        "requirements.txt": "torch\n",
        "trainer/__main__.py": "print('training')\n",
        **extra,
    }


def upload(local, data: bytes, name: str = "source/abc.tar.gz") -> str:
    storage = local.clients().storage
    bucket = storage.lookup_bucket(BUCKET) or storage.create_bucket(BUCKET, location=REGION)
    bucket.blob(name).upload_from_string(data, content_type="application/gzip")
    return name


def create_repository(local) -> None:
    local.clients().registry.create_repository(
        parent=f"projects/{PROJECT}/locations/{REGION}",
        repository_id="images",
        repository=artifactregistry_v1.Repository(format_=artifactregistry_v1.Repository.Format.DOCKER),
    ).result(polling=FAST)


BUILDER = f"builder@{PROJECT}.iam.gserviceaccount.com"


@pytest.fixture(autouse=True)
def build_account(local) -> None:
    """The account builds run as, with what a build needs: read sources, push images, write logs."""
    clients = local.clients()
    clients.iam.create_service_account(request={"name": f"projects/{PROJECT}", "account_id": "builder"})
    policy = clients.projects.get_iam_policy(resource=f"projects/{PROJECT}")
    for role in ("roles/storage.objectViewer", "roles/artifactregistry.writer", "roles/logging.logWriter"):
        policy.bindings.add(role=role, members=[f"serviceAccount:{BUILDER}"])
    clients.projects.set_iam_policy(request={"resource": f"projects/{PROJECT}", "policy": policy})


def build_spec(obj: str, *, file: str = "Dockerfile", images: list[str] | None = None) -> cloudbuild_v1.Build:
    return cloudbuild_v1.Build(
        service_account=f"projects/{PROJECT}/serviceAccounts/{BUILDER}",
        options={"logging": cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY},
        source={"storage_source": {"bucket": BUCKET, "object_": obj}},
        steps=[
            {"id": "pull-cache", "name": "gcr.io/cloud-builders/docker", "entrypoint": "bash",
             "args": ["-c", "docker pull ${_IMAGE}:latest || true"]},
            {"id": "build", "name": "gcr.io/cloud-builders/docker",
             "args": ["build", "--cache-from", "${_IMAGE}:latest", "-t", "${_IMAGE}:${_TAG}",
                      "-t", "${_IMAGE}:latest", "-f", file, "."]},
        ],
        images=["${_IMAGE}:${_TAG}", "${_IMAGE}:latest"] if images is None else images,
        substitutions={"_IMAGE": IMAGE, "_TAG": "abc123"},
    )  # fmt: skip


def test_a_build_without_an_account_runs_as_the_default_one_which_a_new_project_grants_nothing(local):
    create_repository(local)
    spec = build_spec(upload(local, archive(source())))
    spec.service_account = ""
    built = run_build(local, spec)
    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.FETCH_SOURCE_FAILED
    assert (
        "-compute@developer.gserviceaccount.com does not have storage.objects.get"
        in built.failure_info.detail
    )


def test_a_build_account_without_push_rights_fails_at_the_push(local):
    create_repository(local)
    clients = local.clients()
    policy = clients.projects.get_iam_policy(resource=f"projects/{PROJECT}")
    kept = [b for b in policy.bindings if b.role != "roles/artifactregistry.writer"]
    del policy.bindings[:]
    policy.bindings.extend(kept)
    clients.projects.set_iam_policy(request={"resource": f"projects/{PROJECT}", "policy": policy})
    built = run_build(local, build_spec(upload(local, archive(source()))))
    assert built.failure_info.type_ == FailureType.PUSH_FAILED
    assert "artifactregistry.repositories.uploadArtifacts" in built.failure_info.detail


def test_a_build_with_its_own_account_must_keep_its_logs_in_logging_or_a_bucket(local):
    spec = build_spec(upload(local, archive(source())))
    spec.options.logging = cloudbuild_v1.BuildOptions.LoggingMode.LEGACY
    with pytest.raises(exceptions.InvalidArgument, match="CLOUD_LOGGING_ONLY"):
        local.clients().builds.create_build(project_id=PROJECT, build=spec)


def run_build(local, spec: cloudbuild_v1.Build) -> cloudbuild_v1.Build:
    """Create the build, wait for its operation, and return the build as GetBuild reports it."""
    builds = local.clients().builds
    operation = builds.create_build(project_id=PROJECT, build=spec)
    build_id = operation.metadata.build.id
    try:
        operation.result(polling=FAST)
    except exceptions.GoogleAPICallError as error:
        assert "Build failed" in error.message or "cancelled" in error.message
    return builds.get_build(project_id=PROJECT, id=build_id)


def build_log(local, build_id: str) -> list[str]:
    entries = local.clients().logging.list_log_entries(
        request={
            "resource_names": [f"projects/{PROJECT}"],
            "filter": f'resource.type="build" AND resource.labels.build_id="{build_id}"',
            "page_size": 1000,
        }
    )
    assert all(e.log_name == f"projects/{PROJECT}/logs/cloudbuild" for e in entries)
    return [e.text_payload for e in entries]


def test_good_archive_builds_records_the_image_and_its_snapshot(local):
    create_repository(local)
    data = archive(source())
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    builds = local.clients().builds
    operation = builds.create_build(project_id=PROJECT, build=build_spec(upload(local, data)))
    assert operation.metadata.build.status in (Status.QUEUED, Status.WORKING)
    built = operation.result(polling=FAST)

    assert built.status == Status.SUCCESS
    assert built.start_time and built.finish_time >= built.start_time
    assert built.log_url and not built.logs_bucket  # its logs go to Cloud Logging only
    assert [(i.name, i.digest) for i in built.results.images] == [
        (f"{IMAGE}:abc123", digest),
        (f"{IMAGE}:latest", digest),
    ]
    assert list(built.results.build_step_images) == ["", digest]
    assert [s.status for s in built.steps] == [Status.SUCCESS, Status.SUCCESS]
    assert builds.get_build(project_id=PROJECT, id=built.id).status == Status.SUCCESS

    image = local.clients().registry.get_docker_image(name=f"{REPOSITORY}/dockerImages/trainer@{digest}")
    assert sorted(image.tags) == ["abc123", "latest"]

    snapshot = local.emulator.services["builds"].image_dir(digest)
    assert (snapshot / "trainer" / "__main__.py").read_text() == "print('training')\n"
    assert json.loads((snapshot / ".image.json").read_text()) == {
        "entrypoint": ["python", "-m", "trainer"],
        "cmd": ["--help"],
        "workdir": "/app",
        "env": {"PYTHONUNBUFFERED": "1", "PATH": "/app/.venv/bin:$PATH"},
        "user": "",
    }

    log = build_log(local, built.id)
    assert log[0] == f'starting build "{built.id}"'
    assert "Step 1/9 : FROM python:3.11-slim AS base" in log
    assert 'Step 9/9 : CMD ["--help"]' in log
    assert any(line.startswith("(simulated") for line in log)
    assert f"Successfully tagged {IMAGE}:abc123" in log
    assert log[-1] == "DONE"


@pytest.mark.parametrize(
    ("dockerfile_text", "file", "reason"),
    [
        ("FROM python:3.11\nRUNN echo hi\n", "Dockerfile", "unknown instruction: RUNN"),
        ("RUN echo hi\nFROM python:3.11\n", "Dockerfile", "no build stage in current context"),
        ("# only a comment\n", "Dockerfile", "no FROM instruction"),
        ("FROM python:3.11\nCOPY missing.txt /app/\n", "Dockerfile", '"/missing.txt": not found'),
        ('FROM python:3.11\nENTRYPOINT ["python", -m]\n', "Dockerfile", "invalid JSON in the exec form"),
        (GOOD_DOCKERFILE, "docker/Dockerfile.gpu", "docker/Dockerfile.gpu: no such file"),
    ],
)
def test_broken_dockerfile_fails_the_build_with_its_reason_in_the_log(local, dockerfile_text, file, reason):
    create_repository(local)
    obj = upload(local, archive(source(dockerfile_text)))
    built = run_build(local, build_spec(obj, file=file))

    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.USER_BUILD_STEP
    assert 'build step 1 "gcr.io/cloud-builders/docker" failed' in built.failure_info.detail
    assert [s.status for s in built.steps] == [Status.SUCCESS, Status.FAILURE]
    log = build_log(local, built.id)
    assert any(reason in line for line in log), log
    assert log[-1].startswith("ERROR: Build step failure")
    images = local.clients().registry.list_docker_images(parent=REPOSITORY)
    assert list(images) == []


def test_missing_source_object_fails_to_fetch(local):
    upload(local, archive(source()), name="other.tar.gz")
    built = run_build(local, build_spec("source/nothing-here.tar.gz"))
    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.FETCH_SOURCE_FAILED
    assert f"gs://{BUCKET}/source/nothing-here.tar.gz was not found" in built.status_detail
    assert any("was not found" in line for line in build_log(local, built.id))


def test_source_that_is_not_a_gzipped_tar_fails_to_fetch(local):
    built = run_build(local, build_spec(upload(local, b"just some bytes")))
    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.FETCH_SOURCE_FAILED
    assert "not a gzipped tar archive" in built.failure_info.detail


def test_push_to_a_missing_repository_fails_with_the_registry_message(local):
    built = run_build(local, build_spec(upload(local, archive(source()))))
    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.PUSH_FAILED
    assert REPOSITORY in built.failure_info.detail and "not found" in built.failure_info.detail


def test_image_not_built_by_any_step_fails_the_push(local):
    create_repository(local)
    spec = build_spec(upload(local, archive(source())), images=[f"{IMAGE}:never-built"])
    built = run_build(local, spec)
    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.PUSH_IMAGE_NOT_FOUND
    assert "never-built" in built.failure_info.detail


def test_docker_push_step_records_the_image_without_images_field(local):
    create_repository(local)
    spec = build_spec(upload(local, archive(source())), images=[])
    spec.steps.append({"name": "gcr.io/cloud-builders/docker", "args": ["push", f"{IMAGE}:abc123"]})
    built = run_build(local, spec)
    assert built.status == Status.SUCCESS
    assert list(built.results.images) == []
    (image,) = local.clients().registry.list_docker_images(parent=REPOSITORY)
    assert list(image.tags) == ["abc123"]


@pytest.mark.parametrize(
    ("substitutions", "args", "message"),
    [
        ({}, ["build", "-t", "${_IMAGE}", "."], 'key in the template "_IMAGE" is not matched'),
        (
            {"_IMAGE": "x", "_UNUSED": "y"},
            ["build", "-t", "$_IMAGE", "."],
            '"_UNUSED" in the substitution data',
        ),
        ({}, ["build", "-t", "$HOME/x", "."], '"HOME" is not a valid built-in substitution'),
        ({"lower": "x"}, ["build", "."], "does not respect format"),
    ],
)
def test_create_build_validates_substitutions(local, substitutions, args, message):
    spec = cloudbuild_v1.Build(
        steps=[{"name": "gcr.io/cloud-builders/docker", "args": args}], substitutions=substitutions
    )
    with pytest.raises(exceptions.InvalidArgument) as raised:
        local.clients().builds.create_build(project_id=PROJECT, build=spec)
    assert message.replace('"', "'") in raised.value.message


def test_a_build_account_is_a_resource_name_not_a_bare_email(local):
    spec = build_spec(upload(local, archive(source())))
    spec.service_account = BUILDER
    with pytest.raises(exceptions.InvalidArgument, match="projects/{PROJECT_ID}/serviceAccounts/"):
        local.clients().builds.create_build(project_id=PROJECT, build=spec)
    assert list(local.clients().builds.list_builds(project_id=PROJECT)) == []


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"id": "a"}, {"id": "a"}], 'id "a" is not unique'),
        ([{"id": "a", "wait_for": ["b"]}, {"id": "b"}], 'waitFor "b" is not the id of a previous'),
        ([{"id": "a"}, {"wait_for": ["nope"]}], 'waitFor "nope" is not the id of a previous'),
    ],
)
def test_step_ids_are_unique_and_wait_for_names_earlier_steps(local, steps, message):
    spec = cloudbuild_v1.Build(steps=[{"name": "gcr.io/cloud-builders/docker", **step} for step in steps])
    with pytest.raises(exceptions.InvalidArgument, match=message):
        local.clients().builds.create_build(project_id=PROJECT, build=spec)


@pytest.mark.parametrize("tag", ["ccm/v32.2.0", "${_REF}", "-starts-with-a-dash", "t" * 129])
def test_build_tags_are_words_dots_and_dashes_once_substituted(local, tag):
    spec = cloudbuild_v1.Build(
        steps=[{"name": "gcr.io/cloud-builders/docker", "args": ["version"]}],
        tags=["gemma-launch-source-0123456789abcdef", tag],
        substitutions={"_REF": "ccm/v32.2.0"} if "_REF" in tag else {},
    )
    with pytest.raises(exceptions.InvalidArgument, match="invalid build tag"):
        local.clients().builds.create_build(project_id=PROJECT, build=spec)


def test_a_build_without_a_timeout_gets_60_minutes_and_steps_may_start_with_the_build(local):
    create_repository(local)
    spec = build_spec(upload(local, archive(source())))
    spec.steps[1].wait_for = ["-"]
    spec.steps[1].id = "build"
    built = run_build(local, spec)
    assert built.status == Status.SUCCESS, built.failure_info.detail
    assert built.timeout.total_seconds() == 3600


def test_create_build_needs_steps(local):
    with pytest.raises(exceptions.InvalidArgument):
        local.clients().builds.create_build(project_id=PROJECT, build=cloudbuild_v1.Build())


def test_get_list_and_cancel(local, monkeypatch):
    builds = local.clients().builds
    obj = upload(local, archive(source()))
    finished = run_build(local, build_spec(obj, images=[]))
    assert finished.status == Status.SUCCESS
    with pytest.raises(exceptions.FailedPrecondition):
        builds.cancel_build(project_id=PROJECT, id=finished.id)
    with pytest.raises(exceptions.NotFound):
        builds.get_build(project_id=PROJECT, id="no-such-build")
    local.enable_apis("another-project")
    with pytest.raises(exceptions.NotFound):
        builds.get_build(project_id="another-project", id=finished.id)

    # Slow the log down so the build is still running when the cancel arrives.
    monkeypatch.setattr(local.emulator.services["builds"], "line_pause_s", 0.3)
    operation = builds.create_build(project_id=PROJECT, build=build_spec(obj, images=[]))
    running = operation.metadata.build
    assert builds.cancel_build(project_id=PROJECT, id=running.id).status == Status.CANCELLED
    with pytest.raises(exceptions.GoogleAPICallError):
        operation.result(polling=FAST)
    assert builds.get_build(name=running.name).status == Status.CANCELLED

    listed = list(builds.list_builds(project_id=PROJECT))
    assert [b.id for b in listed] == [running.id, finished.id]
    assert [b.id for b in builds.list_builds(project_id=PROJECT, filter='status="SUCCESS"')] == [finished.id]
    paged = builds.list_builds(request={"project_id": PROJECT, "page_size": 1})
    assert [[b.id for b in page.builds] for page in paged.pages] == [[running.id], [finished.id]]
    with pytest.raises(exceptions.InvalidArgument):
        list(builds.list_builds(project_id=PROJECT, filter='create_time>"2025-01-01T00:00:00Z"'))


def test_dockerfile_forms_and_stages():
    parsed = dockerfile.parse(
        "FROM python:3.11 AS deps\n"
        "ENV A=1\n"
        "ENTRYPOINT python serve.py\n"
        "FROM deps\n"
        "SHELL [\"/bin/bash\", \"-lc\"]\n"
        "COPY --from=deps /opt /opt\n"
        "COPY <<EOF /app/config.txt\nkey=value\nEOF\n"
        "WORKDIR srv\n"
        "CMD run --fast\n"
    )  # fmt: skip
    assert parsed.config.entrypoint == ["/bin/sh", "-c", "python serve.py"]
    assert parsed.config.cmd == ["/bin/bash", "-lc", "run --fast"]
    assert parsed.config.env == {"A": "1"} and parsed.config.workdir == "/srv"
    assert all(instruction.sources == [] for instruction in parsed.instructions)
    paths = dockerfile.context_paths(["./src/app.py", "README.md"])
    assert dockerfile.context_has(paths, "src") and dockerfile.context_has(paths, "./src/*.py")
    assert not dockerfile.context_has(paths, "docs/")


# ---- the build context and its .dockerignore --------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "excluded", "kept"),
    [
        # Patterns are anchored at the context root: `*.pyc` is only the top level.
        (["*.pyc"], ["a.pyc"], ["pkg/a.pyc"]),
        (["**/*.pyc", "**/__pycache__"], ["a.pyc", "pkg/a.pyc", "pkg/__pycache__/m.py"], ["pkg/a.py"]),
        # A directory takes everything under it; a later `!` brings a path back; the last match wins.
        (["launcher"], ["launcher/cli.py", "launcher/emulator/server.py"], ["trainer/train.py"]),
        (["launcher", "!launcher/cli.py"], ["launcher/build.py"], ["launcher/cli.py"]),
        (["*.md", "!README*.md", "README-secret.md"], ["NOTES.md", "README-secret.md"], ["README.md"]),
        (["*.md", "README-secret.md", "!README*.md"], ["NOTES.md"], ["README.md", "README-secret.md"]),
        # Leading slashes and `.` / `..` are cleaned away, as Go's filepath.Clean does.
        (["/docs/", "./build/../dist"], ["docs/a.md", "dist/x.whl"], ["build/x", "src/docs/a.md"]),
        # The ignore file itself can be excluded from COPY, though the builder still receives it.
        ([".dockerignore", "Dockerfile"], [".dockerignore", "Dockerfile"], ["app.py"]),
    ],
)
def test_dockerignore_rules(lines, excluded, kept):
    excluder = dockerignore.Excluder(lines)
    assert [path for path in excluded if not excluder.excluded(path)] == []
    assert [path for path in kept if excluder.excluded(path)] == []


def test_dockerignore_file_is_read_as_docker_reads_it():
    text = "# comment\n\n  *.log  \n!keep.log\n"
    assert dockerignore.patterns(text) == ["*.log", "!keep.log"]
    names = {
        ".dockerignore",
        "docker/Dockerfile.gpu",
        "docker/Dockerfile.gpu.dockerignore",
        "app/.dockerignore",
    }
    # A Dockerfile's own ignore file wins over the context's.
    assert (
        dockerignore.ignore_file(names, "", "docker/Dockerfile.gpu") == "docker/Dockerfile.gpu.dockerignore"
    )
    assert dockerignore.ignore_file(names, "", "Dockerfile") == ".dockerignore"
    assert dockerignore.ignore_file(names, "app", "app/Dockerfile") == "app/.dockerignore"
    assert dockerignore.ignore_file(names, "lib", "lib/Dockerfile") is None


@pytest.mark.parametrize(
    ("ignore", "copy", "missing"),
    [
        ("trainer\n", "COPY trainer/ ./trainer/", "/trainer"),
        ("**/__main__.py\n", "COPY trainer/__main__.py ./", "/trainer/__main__.py"),
        ("*\n!trainer\n", "COPY requirements.txt ./", "/requirements.txt"),
        ("Dockerfile\n", "COPY Dockerfile ./", "/Dockerfile"),
        ("", "COPY ./not-there/ ./", "/not-there"),
    ],
)
def test_copy_of_an_ignored_or_missing_path_fails_as_buildkit_reports_it(local, ignore, copy, missing):
    create_repository(local)
    text = f"FROM python:3.11-slim\nWORKDIR /app\n{copy}\n"
    built = run_build(local, build_spec(upload(local, archive(source(text, **{".dockerignore": ignore})))))

    assert built.status == Status.FAILURE
    assert built.failure_info.type_ == FailureType.USER_BUILD_STEP
    log = build_log(local, built.id)
    (error,) = [line for line in log if "failed to compute cache key" in line]
    assert error.startswith(
        "ERROR: failed to solve: failed to compute cache key: failed to calculate checksum"
    )
    assert error.endswith(f'"{missing}": not found')
    assert "Dockerfile:3" in log and f"   3 | >>> {copy}" in log


def test_ignored_files_that_no_copy_reads_do_not_fail_the_build(local):
    create_repository(local)
    ignore = "# what the image never needs\n**/*.md\nDockerfile\n.dockerignore\n!trainer/__main__.py\n"
    files = source(**{".dockerignore": ignore, "NOTES.md": "", "trainer/README.md": ""})
    built = run_build(local, build_spec(upload(local, archive(files))))
    assert built.status == Status.SUCCESS, build_log(local, built.id)


def test_a_dockerfiles_own_ignore_file_replaces_the_contexts(local):
    create_repository(local)
    files = source(**{".dockerignore": "trainer\n", "Dockerfile.dockerignore": "docs\n"})
    assert run_build(local, build_spec(upload(local, archive(files)))).status == Status.SUCCESS
    files["Dockerfile.dockerignore"] = "requirements.txt\n"
    built = run_build(local, build_spec(upload(local, archive(files), name="source/other.tar.gz")))
    assert built.status == Status.FAILURE
    assert any(line.endswith('"/requirements.txt": not found') for line in build_log(local, built.id))


def test_create_build_outside_the_allowed_regions_is_refused(local, tmp_path):
    spec = build_spec(upload(local, archive(source())), images=[])
    builds = local.clients().builds
    with pytest.raises(exceptions.FailedPrecondition) as refused:
        builds.create_build(parent=f"projects/{PROJECT}/locations/europe-west4", build=spec)
    assert "due to quota restrictions, cannot run builds in this region" in refused.value.message
    for location in ("global", "europe-west1", "us-central1"):
        operation = builds.create_build(parent=f"projects/{PROJECT}/locations/{location}", build=spec)
        assert operation.result(polling=FAST).name.startswith(f"projects/{PROJECT}/locations/{location}/")


def test_an_emulator_can_allow_every_region_or_others(tmp_path, monkeypatch):
    for allowed, location in ((None, "europe-west4"), (["asia-south1"], "asia-south1")):
        apis = (*DEFAULT_ENABLED, "cloudbuild.googleapis.com")
        with Emulator(data_dir=tmp_path / location, build_regions=allowed, enabled_apis=apis) as emulator:
            monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
            builds = Clients(PROJECT).builds
            spec = cloudbuild_v1.Build(steps=[{"name": "busybox", "args": ["true"]}])
            operation = builds.create_build(parent=f"projects/{PROJECT}/locations/{location}", build=spec)
            assert operation.result(polling=FAST).status == Status.SUCCESS
            if allowed is not None:
                with pytest.raises(exceptions.FailedPrecondition):
                    builds.create_build(parent=f"projects/{PROJECT}/locations/us-central1", build=spec)


def test_the_image_config_keeps_the_user_it_runs_as():
    # Cloud Run runs the container as the image's USER; the emulator needs it to judge mount ownership.
    parsed = dockerfile.parse("FROM python:3.11-slim\nARG UID=10001\nUSER ${UID}:${UID}\n")
    assert parsed.config.user == "10001:10001"
    assert dockerfile.parse("FROM python:3.11-slim\n").config.user == ""


def test_a_build_account_deleted_by_hand_is_refused_as_google_refuses_act_as(local):
    # IAM checks actAs on the account as a resource: a deleted one is denied even to the project owner,
    # in the words of a missing grant ("... (or it may not exist).").
    clients = local.clients()
    clients.iam.delete_service_account(name=f"projects/{PROJECT}/serviceAccounts/{BUILDER}")
    spec = build_spec(upload(local, archive(source())))
    with pytest.raises(exceptions.PermissionDenied) as raised:
        clients.builds.create_build(project_id=PROJECT, build=spec)
    assert raised.value.message == (
        f"Permission 'iam.serviceaccounts.actAs' denied on service account {BUILDER} (or it may not exist)."
    )
    assert list(clients.builds.list_builds(project_id=PROJECT)) == []
    # What the launcher makes of it: either cause, and what to do about each.
    shown = translate(raised.value, None, "build")
    assert shown.message.startswith("Permission denied on build: Permission 'iam.serviceaccounts.actAs'")
    assert shown.hint.startswith(f"If {BUILDER} was deleted, run `gemma-launch up` to create it again")
    assert (
        f"add-iam-policy-binding {BUILDER} --member=user:YOUR_EMAIL --role=roles/iam.serviceAccountUser"
        in (shown.hint)
    )


def test_a_build_whose_account_is_disabled_is_accepted_and_fails_at_its_start_without_a_log(local):
    # A disabled account still exists (actAs passes), but no access token is issued for it, so the build
    # can neither fetch its source nor write its log; enabled again, the same build runs.
    create_repository(local)
    clients = local.clients()
    name = f"projects/{PROJECT}/serviceAccounts/{BUILDER}"
    clients.iam.disable_service_account(request={"name": name})
    spec = build_spec(upload(local, archive(source())))
    built = run_build(local, spec)
    assert built.status == Status.FAILURE
    assert built.failure_info.detail == (
        f"The build runs as {BUILDER}, but service account {BUILDER} is disabled: no access token can be "
        "issued for it."
    )
    assert build_log(local, built.id) == []
    clients.iam.enable_service_account(request={"name": name})
    assert run_build(local, spec).status == Status.SUCCESS
