from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from google.cloud.devtools import cloudbuild_v1
from google.cloud.logging_v2.types import ListLogEntriesRequest

from launcher import logs, provision
from launcher.build import DRAIN_POLLS, build_image, load_build_config, poll_intervals
from launcher.build_context import pack_source
from launcher.emulator.logging import ReadQuota
from launcher.errors import UserError
from launcher.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_TOKEN = "hf_FakeTokenForTestsOnly0123456789abcdef"
SETTINGS = {"project_id": "demo-project", "region": "europe-west4"}


def _names(archive: Path) -> list[str]:
    with tarfile.open(archive) as tar:
        return tar.getnames()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


PROJECT = {
    "Dockerfile": (
        'FROM python:3.11-slim\nWORKDIR /app\nCOPY app.py /app/app.py\nENTRYPOINT ["python", "/app/app.py"]\n'
    ),
    "app.py": "print('hello from the image')\n",
}


# ---- the source archive --------------------------------------------------------------------------


def test_pack_source_is_reproducible(tmp_path: Path) -> None:
    root = _write(tmp_path / "src", {"a.py": "a = 1\n", "pkg/b.py": "b = 2\n", "run.sh": "#!/bin/sh\n"})
    (root / "run.sh").chmod(0o775)
    first = pack_source(root, tmp_path / "first.tar.gz")
    # Different times, umask and creation order must not change the bytes.
    os.utime(root / "a.py", (1_000_000, 1_000_000))
    (root / "pkg/b.py").chmod(0o600)
    second = pack_source(root, tmp_path / "second.tar.gz")
    assert first.sha256 == second.sha256
    assert first.path.read_bytes() == second.path.read_bytes()
    assert (first.files, first.bytes) == (3, first.path.stat().st_size)
    with tarfile.open(first.path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert list(members) == ["a.py", "pkg/b.py", "run.sh"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
        assert (members["run.sh"].mode, members["pkg/b.py"].mode) == (0o755, 0o644)
    (root / "a.py").write_text("a = 3\n")
    assert pack_source(root, tmp_path / "third.tar.gz").sha256 != first.sha256


def test_pack_source_honours_gcloudignore_over_dockerignore(tmp_path: Path) -> None:
    root = _write(
        tmp_path,
        {
            ".gcloudignore": "*.log\ndata/\n!data/keep.txt\n#!include:.gitignore\n",
            ".gitignore": "out/\n",
            ".dockerignore": "*.py\n",
            "main.py": "",
            "debug.log": "",
            "sub/trace.log": "",
            "data/big.bin": "",
            "out/model.bin": "",
        },
    )
    names = _names(pack_source(root, tmp_path / "a.tar.gz").path)
    # .dockerignore is not read when .gcloudignore exists; a re-included file under an excluded
    # directory stays out, as in git.
    assert "main.py" in names
    assert not {"debug.log", "sub/trace.log", "data/big.bin", "data/keep.txt", "out/model.bin"} & set(names)


def test_pack_source_reads_dockerignore_relative_to_root(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "src",
        {".dockerignore": "*.md\n!KEEP.md\ncache\n", "NOTES.md": "", "KEEP.md": "", "docs/guide.md": ""},
    )
    _write(root, {"cache/x": "", "pkg/cache/y": ""})
    names = set(_names(pack_source(root, tmp_path / "a.tar.gz").path))
    # Docker anchors patterns at the context root: `*.md` leaves docs/guide.md in, `cache` only the top one.
    assert names == {".dockerignore", "KEEP.md", "docs/guide.md", "pkg/cache/y"}


def test_pack_source_always_leaves_secrets_and_environments_out(tmp_path: Path) -> None:
    root = _write(
        tmp_path / "src",
        {
            ".gcloudignore": "!.env\n!*.pem\n",
            ".env": f"HF_TOKEN={FAKE_TOKEN}\n",
            ".env.local": f"HF_TOKEN={FAKE_TOKEN}\n",
            "deploy/tls.pem": "-----BEGIN PRIVATE KEY-----\n",
            "application_default_credentials.json": "{}",
            "sa-key.json": "{}",
            ".git/config": "",
            ".venv/bin/python": "",
            "pkg/__pycache__/m.cpython-311.pyc": "",
            "pkg/m.py": "",
            "gemma-launch.toml": 'project_id = "demo-project"\n',
        },
    )
    archive = pack_source(root, tmp_path / "a.tar.gz")
    assert _names(archive.path) == [".gcloudignore", "gemma-launch.toml", "pkg/m.py"]
    with tarfile.open(archive.path) as tar:
        content = b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())
    assert FAKE_TOKEN.encode() not in content


def test_pack_source_refuses_a_file_holding_the_token(tmp_path: Path) -> None:
    root = _write(tmp_path / "src", {"config/settings.py": f"TOKEN = '{FAKE_TOKEN}'\n"})
    with pytest.raises(UserError) as caught:
        pack_source(root, tmp_path / "a.tar.gz", forbidden=[FAKE_TOKEN])
    assert "config/settings.py" in caught.value.message
    assert FAKE_TOKEN not in caught.value.message + caught.value.hint


def test_a_made_up_token_that_a_project_file_holds_gets_a_random_one_to_use_instead(tmp_path: Path) -> None:
    """`hf_token` is in build.py, `hf_demo` in scripts/demo.sh: a guessed stand-in trips the check, so the
    hint gives a command that makes one no file holds."""
    with pytest.raises(UserError) as caught:
        pack_source(REPO_ROOT, tmp_path / "a.tar.gz", forbidden=["hf_token"])
    assert caught.value.message.endswith(
        "contains your Hugging Face token; it must not be uploaded with the source."
    )
    command = caught.value.hint.split(": ", 1)[1]
    assert command.startswith("export HF_TOKEN=hf_$(python -c ")
    made_up = subprocess.run(
        ["bash", "-c", f"{command}; echo $HF_TOKEN"],
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert re.fullmatch(r"hf_[0-9a-f]{34}", made_up)
    assert pack_source(REPO_ROOT, tmp_path / "b.tar.gz", forbidden=[made_up]).files > 0


def test_pack_source_keeps_symlinks_as_links(tmp_path: Path) -> None:
    outside = _write(tmp_path / "outside", {"secret.txt": "do not follow"})
    root = _write(tmp_path / "src", {"a.py": ""})
    (root / "linked").symlink_to(outside)
    with tarfile.open(pack_source(root, tmp_path / "a.tar.gz").path) as tar:
        link = tar.getmember("linked")
        assert link.issym() and link.linkname == str(outside)
        assert tar.getnames() == ["a.py", "linked"]


# ---- cloudbuild.yaml -----------------------------------------------------------------------------


def test_cloudbuild_yaml_is_a_well_formed_build() -> None:
    build = load_build_config(REPO_ROOT / "cloudbuild.yaml")
    assert isinstance(build, cloudbuild_v1.Build)
    assert [step.name for step in build.steps] == ["gcr.io/cloud-builders/docker"] * 2
    pull, docker_build = build.steps
    assert pull.entrypoint == "bash" and "docker pull ${_IMAGE}:latest || true" in pull.args[-1]
    args = list(docker_build.args)
    assert args[0] == "build" and args[-1] == "."
    assert args[args.index("--cache-from") + 1] == "${_IMAGE}:latest"
    assert "BUILDKIT_INLINE_CACHE=1" in args
    assert {args[i + 1] for i, arg in enumerate(args) if arg == "-t"} == {
        "${_IMAGE}:${_TAG}",
        "${_IMAGE}:latest",
    }
    assert list(build.images) == ["${_IMAGE}:${_TAG}", "${_IMAGE}:latest"]
    assert build.options.machine_type == cloudbuild_v1.BuildOptions.MachineType.E2_HIGHCPU_8
    assert build.options.logging == cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY
    assert build.timeout.total_seconds() == 3600
    # Cloud Build rejects a substitution the config does not use, and the launcher sends exactly these.
    text = json.dumps(cloudbuild_v1.Build.to_dict(build))
    assert "${_IMAGE}" in text and "${_TAG}" in text


def test_cloudbuild_yaml_accepts_snake_case_and_rejects_unknown_fields(tmp_path: Path) -> None:
    config = tmp_path / "cloudbuild.yaml"
    config.write_text("steps:\n- name: busybox\n  args: [echo]\noptions:\n  machine_type: E2_HIGHCPU_8\n")
    assert load_build_config(config).options.machine_type.name == "E2_HIGHCPU_8"
    config.write_text("steps:\n- name: busybox\n  argz: [echo]\n")
    with pytest.raises(UserError, match="argz"):
        load_build_config(config)


def test_gcloudignore_of_the_repository_keeps_what_the_image_needs(tmp_path: Path) -> None:
    kept = [
        "Dockerfile",
        ".dockerignore",
        "README.md",
        "pyproject.toml",
        "cloudbuild.yaml",
        "trainer/train.py",
    ]
    kept += ["launcher/cli.py", "gemma-launch.toml", "bench/run.py"]
    dropped = [".git/HEAD", ".venv/pyvenv.cfg", "tests/test_x.py", "docs/x.md", ".demo/model/config.json"]
    dropped += [
        "bench/results/raw.log",
        "gemma_launch.egg-info/PKG-INFO",
        ".pytest_cache/v",
        "build/lib/x.py",
    ]
    root = _write(tmp_path / "src", {name: "" for name in kept + dropped})
    (root / ".gcloudignore").write_text((REPO_ROOT / ".gcloudignore").read_text())
    assert _names(pack_source(root, tmp_path / "a.tar.gz").path) == sorted(kept)


# ---- build_image against the emulator ------------------------------------------------------------


# What `up` provisions before a build: the bucket and repository, and the build's own account with
# read on the source, write on the repository and log writing.
BUILD_PREREQUISITES = (
    provision.ensure_build_account,
    provision.ensure_bucket,
    provision.ensure_build_source_access,
    provision.ensure_repository,
    provision.ensure_repository_access,
    provision.ensure_build_log_writer,
)


@pytest.fixture
def cloud(local, tmp_path: Path):
    settings = Settings.model_validate({**SETTINGS, "hf_token": FAKE_TOKEN})
    clients = local.clients()
    for step in BUILD_PREREQUISITES:
        step(clients, settings)
    root = _write(
        tmp_path / "project",
        {
            **PROJECT,
            ".env": f"HF_TOKEN={FAKE_TOKEN}\n",
            "cloudbuild.yaml": (REPO_ROOT / "cloudbuild.yaml").read_text(),
        },
    )
    return clients, settings, root


def _calls(local, method: str) -> list[dict]:
    return [call for call in local.record() if call["method"] == method]


def test_build_image_builds_pushes_and_then_skips_unchanged_source(local, cloud) -> None:
    clients, settings, root = cloud
    # Slow the emulated build down enough that polls land while it runs.
    local.emulator.services["builds"].line_pause_s = 0.1
    lines: list[str] = []
    running_when_shown: list[bool] = []

    def on_line(line: str) -> None:
        lines.append(line)
        builds = local.emulator.state.table("builds").values()
        running_when_shown.append(any(b["status"] in ("QUEUED", "WORKING") for b in builds))

    built = build_image(clients, settings, root, on_line=on_line)

    assert built.change.status == "created"
    repository_uri = "europe-west4-docker.pkg.dev/demo-project/gemma3-finetuning-repo/gemma3-finetune"
    assert built.uri.startswith(f"{repository_uri}@sha256:") and len(built.uri.split("@sha256:")[1]) == 64
    images = list(clients.registry.list_docker_images(parent=settings.repository_name))
    assert [(image.uri, sorted(image.tags)) for image in images] == [
        (built.uri, sorted([built.tag, "latest"]))
    ]
    # The Dockerfile's instructions came through the streamed log, each line once, in order.
    steps = [line for line in lines if "Step 1/4 : FROM python:3.11-slim" in line or "ENTRYPOINT" in line]
    assert len(steps) == 2 and steps[0].endswith("FROM python:3.11-slim")
    # Every entry Logging holds for the build was shown once, in order, some while the build ran.
    build_id = lines[0].split()[2]
    assert lines[0] == f"Cloud Build {build_id} started"  # no console link: the emulator's is no page
    entries = list(
        clients.logging.list_log_entries(
            request=ListLogEntriesRequest(
                resource_names=["projects/demo-project"],
                filter=f'resource.type="build" AND resource.labels.build_id="{build_id}"',
                order_by="timestamp asc",
                page_size=1000,
            )
        )
    )
    assert len(entries) == len(lines) - 1 and entries[-1].text_payload == "DONE"
    assert all(line.endswith(entry.text_payload) for line, entry in zip(lines[1:], entries, strict=True))
    assert any(running_when_shown[1:]) and not running_when_shown[-1]

    (create,) = _calls(local, "CreateBuild")
    # Built in Cloud Build's global location, pushed to the regional repository.
    assert create["request"]["parent"] == "projects/demo-project/locations/global"
    build = create["request"]["build"]
    assert build["substitutions"] == {"_IMAGE": repository_uri, "_TAG": built.tag}
    assert build["options"]["logging"] == cloudbuild_v1.BuildOptions.LoggingMode.CLOUD_LOGGING_ONLY
    source = build["source"]["storageSource"]
    assert source["bucket"] == settings.bucket and source["object"].startswith("source/")
    archive = local.emulator.bucket_dir(settings.bucket) / source["object"]
    assert source["object"] == f"source/{hashlib.sha256(archive.read_bytes()).hexdigest()}.tar.gz"
    assert ".env" not in _names(archive) and FAKE_TOKEN.encode() not in archive.read_bytes()

    again = build_image(clients, settings, root, on_line=lines.append)
    assert (again.change.status, again.uri, again.tag) == ("unchanged", built.uri, built.tag)
    assert len(_calls(local, "CreateBuild")) == 1
    assert len(_calls(local, "objects.insert")) == 1
    assert FAKE_TOKEN not in (local.record_path.read_text())


def test_a_builds_log_is_read_well_under_loggings_quota_of_60_reads_a_minute_however_long_it_builds():
    # One ListLogEntries call per poll, at these pauses; the drain after the build adds at most DRAIN_POLLS.
    reads_at = [0.0, *itertools.accumulate(itertools.islice(poll_intervals(), 1000))]
    busiest_minute = max(sum(1 for t in reads_at if start <= t < start + 60) for start in reads_at)
    assert busiest_minute + DRAIN_POLLS <= 25
    assert sum(1 for t in reads_at if 600 <= t < 660) == 12  # an hour-long build, minute after minute


def test_a_build_whose_log_reads_hit_the_quota_waits_and_shows_every_line_once(local, cloud, capsys) -> None:
    clients, settings, root = cloud
    local.emulator.services["builds"].line_pause_s = 0.05
    # Another reader of the project's logs takes the whole quota as the build starts, and again and again.
    quota = local.emulator.services["logging"].read_quota = ReadQuota(1, window_s=1.5)
    lines: list[str] = []

    def on_line(line: str) -> None:
        if not lines:
            list(clients.logging.list_log_entries(resource_names=["projects/demo-project"]))
        lines.append(line)

    built = build_image(clients, settings, root, on_line=on_line)

    assert built.change.status == "created"
    assert quota.refused >= 1
    build_id = lines[0].split()[2]
    quota.window_s = 0.001
    entries = list(
        clients.logging.list_log_entries(
            request=ListLogEntriesRequest(
                resource_names=["projects/demo-project"],
                filter=f'resource.type="build" AND resource.labels.build_id="{build_id}"',
                page_size=1000,
            )
        )
    )
    assert len(entries) == len(lines) - 1 and entries[-1].text_payload == "DONE"
    assert all(line.endswith(entry.text_payload) for line, entry in zip(lines[1:], entries, strict=True))
    assert capsys.readouterr().err.splitlines() == [logs.QUOTA_NOTICE]


def test_a_build_whose_log_reads_wait_past_the_deadline_says_the_quota_is_taken(
    local, cloud, monkeypatch
) -> None:
    clients, settings, root = cloud
    monkeypatch.setenv("GEMMA_LAUNCH_RETRY_DEADLINE", "1")
    monkeypatch.setattr(logs, "RETRY", logs.RETRY.with_timeout(1.0))
    local.emulator.services["logging"].read_quota = ReadQuota(1, window_s=60)
    list(clients.logging.list_log_entries(resource_names=["projects/demo-project"]))  # another reader's

    with pytest.raises(UserError) as raised:
        build_image(clients, settings, root, on_line=lambda line: None)

    assert raised.value.message.startswith(
        "Gave up on build europe-west4-docker.pkg.dev/demo-project/gemma3-finetuning-repo/gemma3-finetune "
        "after waiting 1 s for Cloud Logging's read quota (60 log reads a minute per project): other "
        "readers of project demo-project's logs use all of it."
    )
    assert raised.value.hint.startswith("Close the other readers (a Logs Explorer tab")


def test_build_image_dry_run_changes_nothing(local, cloud) -> None:
    clients, settings, root = cloud
    planned = build_image(clients, settings, root, dry_run=True)
    assert planned.change.status == "would create"
    assert planned.uri == f"{settings.image_repository_uri}:{planned.tag}"
    assert (
        f"_TAG={planned.tag}" in planned.change.command and "gcloud builds submit" in planned.change.command
    )
    assert " --region=global " in planned.change.command
    assert not _calls(local, "CreateBuild") and not _calls(local, "objects.insert")


def test_a_broken_dockerfile_fails_with_the_build_log(local, cloud) -> None:
    clients, settings, root = cloud
    (root / "Dockerfile").write_text("FROM python:3.11-slim\nCOPY missing.py /app/\n")
    lines: list[str] = []
    with pytest.raises(UserError) as caught:
        build_image(clients, settings, root, on_line=lines.append)
    error = caught.value
    assert "FAILURE" in error.message and '"/missing.py": not found' in error.message
    assert "Step 2/2 : COPY missing.py /app/" in error.message
    assert any("failed to compute cache key" in line for line in lines)
    # The emulator's build is on no console: the hint says how to see its whole log instead.
    assert "console.cloud.google.com" not in error.hint and "gemma-launch up --verbose" in error.hint
    assert not list(clients.registry.list_docker_images(parent=settings.repository_name))
    # A retry of the same source builds again but reuses the archive already in the bucket.
    with pytest.raises(UserError):
        build_image(clients, settings, root, on_line=lines.append)
    assert (len(_calls(local, "CreateBuild")), len(_calls(local, "objects.insert"))) == (2, 1)
    assert FAKE_TOKEN not in local.record_path.read_text()


def test_the_repositorys_dockerfile_builds_from_what_its_ignore_files_send(local, cloud, tmp_path) -> None:
    clients, settings, _ = cloud
    # The repository's own Dockerfile, ignore files and build config, over a stand-in of each tree it copies.
    files = {
        name: (REPO_ROOT / name).read_text() for name in ("Dockerfile", ".dockerignore", ".gcloudignore")
    }
    files["cloudbuild.yaml"] = (REPO_ROOT / "cloudbuild.yaml").read_text()
    files.update(
        {
            "pyproject.toml": "[project]\nname = 'gemma-launch'\n",
            "requirements.lock": "",
            "README.md": "",
            "launcher/cli.py": "",
            "launcher/emulator/server.py": "",
            "trainer/__main__.py": "",
            "tests/test_x.py": "",
        }
    )
    root = _write(tmp_path / "repository", files)
    built = build_image(clients, settings, root, on_line=lambda line: None)
    assert built.change.status == "created"
    snapshot = local.emulator.services["builds"].image_dir(built.uri.split("@")[1])
    assert json.loads((snapshot / ".image.json").read_text())["entrypoint"] == ["python", "-m", "trainer"]


def test_a_region_the_project_may_not_build_in_names_the_setting_to_change(local, cloud) -> None:
    clients, _, root = cloud
    # The emulator, like a new project, builds only in global and the documented restricted regions.
    settings = Settings.model_validate({**SETTINGS, "hf_token": FAKE_TOKEN, "build_location": "europe-west4"})
    with pytest.raises(UserError) as caught:
        build_image(clients, settings, root, on_line=lambda line: None)
    assert "Cloud Build refused to build in europe-west4" in caught.value.message
    assert "cannot run builds in this region" in caught.value.message
    assert caught.value.hint.startswith("Use --build-location global")

    allowed = Settings.model_validate({**SETTINGS, "hf_token": FAKE_TOKEN, "build_location": "europe-west1"})
    built = build_image(clients, allowed, root, on_line=lambda line: None)
    assert built.uri.startswith("europe-west4-docker.pkg.dev/")
    creates = _calls(local, "CreateBuild")
    assert [call["request"]["parent"].rsplit("/", 1)[1] for call in creates] == [
        "europe-west4",
        "europe-west1",
    ]
