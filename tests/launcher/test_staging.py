"""Staging: the real huggingface_hub client against the Hub stand-in, the real storage client against the
emulator; assertions on the bucket's bytes, the emulator's request record and what the Hub served."""

from __future__ import annotations

import contextlib
import io
import random
import re
import socket
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from huggingface_hub import constants
from pydantic import SecretStr
from rich.console import Console

from launcher import staging
from launcher.cli import main
from launcher.errors import UserError
from launcher.settings import Settings
from launcher.staging import transfer
from launcher.staging.events import BytesMoved, Event, TransferEnded, TransferStarted
from launcher.staging.transfer import CRC32C_KEY
from launcher.staging.view import StagingView
from tests.support.hub_standin import HubStandin

TOKEN = "hf_StandinToken0123456789abcdefXYZ"
UNGRANTED = "hf_OtherAccount0123456789abcdefXY"
PROJECT = "demo-project"
BUCKET = f"{PROJECT}-gemma3-finetuning"
MODEL = "acme/gemma-3-tiny-it"
DATASET = "acme/oxford-iiit-pet"
MiB = 1 << 20


@cache
def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def model_files(big: int = 12 * MiB + 5) -> dict[str, bytes]:
    """A sharded checkpoint's shape: small JSON files in git, the rest in LFS."""
    return {
        "config.json": b'{"model_type": "gemma3", "hidden_size": 64}',
        "tokenizer.json": random_bytes(40_000, 1),
        "model-00001-of-00002.safetensors": random_bytes(big, 2),
        "model-00002-of-00002.safetensors": random_bytes(9 * MiB + 77, 3),
        "model.safetensors.index.json": b'{"weight_map": {}}',
    }


DATASET_FILES = {
    "README.md": b"---\nlicense: cc-by-sa-4.0\n---\n# Oxford-IIIT Pet\n",
    "data/train-00000-of-00001.parquet": b"PAR1" + random_bytes(300_000, 4),
    "data/test-00000-of-00001.parquet": b"PAR1" + random_bytes(200_000, 5),
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandin]:
    # huggingface_hub reads HF_ENDPOINT once, at import: point its constant at the stand-in instead.
    with HubStandin(tokens={TOKEN, UNGRANTED}) as standin:
        monkeypatch.setattr(constants, "ENDPOINT", standin.endpoint)
        monkeypatch.setenv("HF_ENDPOINT", standin.endpoint)
        standin.add_repo(MODEL, model_files())
        standin.add_repo(DATASET, DATASET_FILES, repo_type="dataset")
        yield standin


@pytest.fixture
def bucket(local):
    return local.clients(PROJECT).storage.create_bucket(BUCKET, location="europe-west4")


def settings(token: str | None = TOKEN, **values: str) -> Settings:
    return Settings(
        project_id=PROJECT,
        model_id=MODEL,
        dataset_id=DATASET,
        hf_token=SecretStr(token) if token else None,
        **values,
    )


def run(local, token: str | None = TOKEN, on_bytes=None, **options) -> tuple[list[SimpleNamespace], str]:
    """Stage; each source's outcome as `stage --json` shows it, and what the CLI would print."""
    out = io.StringIO()
    view = StagingView(Console(file=out, width=200), verbose=options.get("verbose", False))

    def on_event(event: Event) -> None:
        view(event)
        if on_bytes is not None and isinstance(event, BytesMoved):
            on_bytes(event.path, event.count)

    changes = staging.stage(local.clients(PROJECT), settings(token), on_event=on_event, **options)
    return [SimpleNamespace(**staging.document(change)) for change in changes], out.getvalue()


def bucket_files(local, prefix: str) -> dict[str, bytes]:
    """The bucket's files under prefix, as the job's GCS mount would show them (the marker aside)."""
    root = local.emulator.bucket_dir(BUCKET) / prefix
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and path.name != staging.MARKER
    }


def marker(local, prefix: str) -> dict | None:
    return staging.read_marker(local.clients(PROJECT).storage, BUCKET, prefix)


def uploads(local) -> list[str]:
    """Every upload request: the object named for multipart uploads and session starts, '?' for the PUTs
    into a session and the status queries (their URL names only the session)."""
    return [
        entry["request"]["params"]["bucket_name"] + ":" + _object_of(entry)
        for entry in local.record()
        if entry["service"] == "storage" and entry["method"] == "objects.insert"
    ]


def _object_of(entry: dict) -> str:
    request = entry["request"]
    return (request.get("resource") or {}).get("name") or request["query"].get("name", ["?"])[0]


def test_hub_repo_lands_byte_identical_and_a_second_run_transfers_nothing(local, hub, bucket):
    big = model_files(200 * 1000 * 1000 + 3)
    commit = hub.add_repo(MODEL, big)

    staged, output = run(local, verbose=True)  # a line per file

    assert [(s.kind, s.prefix, s.status, s.files) for s in staged] == [
        ("model", MODEL, "created", 5),
        ("dataset", "datasets/oxford-iiit-pet", "created", 3),
    ]
    assert staged[0].bytes == sum(len(content) for content in big.values())
    assert bucket_files(local, MODEL) == big
    assert bucket_files(local, "datasets/oxford-iiit-pet") == DATASET_FILES
    complete = marker(local, MODEL)
    assert complete is not None and complete["revision"] == commit
    assert {entry["path"]: entry["size"] for entry in complete["files"]} == {
        path: len(content) for path, content in big.items()
    }
    shard_name = "model-00001-of-00002.safetensors"
    shard = local.clients(PROJECT).storage.bucket(BUCKET).get_blob(f"{MODEL}/{shard_name}")
    assert shard.metadata["hf-sha256"] == hub.repos[("model", MODEL)].files[shard_name].sha256
    assert shard.metadata["hf-revision"] == commit
    assert shard.metadata["source"] == MODEL
    assert shard.metadata[CRC32C_KEY] == shard.crc32c
    assert "model-00001-of-00002.safetensors" in output
    generations = {blob.name: blob.generation for blob in local.clients(PROJECT).storage.list_blobs(BUCKET)}
    served = len(hub.downloads())
    uploaded = len(uploads(local))

    again, _ = run(local)

    assert [s.status for s in again] == ["unchanged", "unchanged"]
    assert len(hub.downloads()) == served
    assert len(uploads(local)) == uploaded
    assert {
        blob.name: blob.generation for blob in local.clients(PROJECT).storage.list_blobs(BUCKET)
    } == generations


class Killed(Exception):
    pass


def test_interrupted_staging_resumes_with_only_what_is_missing(local, hub, bucket):
    files = model_files()
    seen: dict[str, int] = {}

    def kill_midway(path: str, count: int) -> None:
        seen[path] = seen.get(path, 0) + count
        if path == "model-00002-of-00002.safetensors" and seen[path] >= 4 * MiB:
            raise Killed

    # One worker, largest file first: the first shard completes, the second dies halfway through.
    with pytest.raises(Killed):
        run(local, workers=1, on_bytes=kill_midway)

    kept = bucket_files(local, MODEL)
    assert kept == {"model-00001-of-00002.safetensors": files["model-00001-of-00002.safetensors"]}
    assert marker(local, MODEL) is None
    before = len(uploads(local))
    served_before = len(hub.downloads())

    staged, _ = run(local)

    assert staged[0].status == "updated"
    assert bucket_files(local, MODEL) == files
    fetched = {request.path.rsplit("/", 1)[-1] for request in hub.downloads()[served_before:]}
    assert "model-00001-of-00002.safetensors" not in fetched
    assert "model-00002-of-00002.safetensors" in fetched
    resumed = {name.rsplit("/", 1)[-1] for name in uploads(local)[before:]}
    assert "model-00001-of-00002.safetensors" not in resumed
    assert marker(local, MODEL) is not None


def test_an_object_replaced_with_wrong_bytes_is_detected_and_uploaded_again(local, hub, bucket):
    run(local)
    storage_bucket = local.clients(PROJECT).storage.bucket(BUCKET)
    victim = storage_bucket.get_blob(f"{MODEL}/tokenizer.json")
    forged = storage_bucket.blob(victim.name)
    forged.metadata = dict(victim.metadata)  # the same claims, including the verified crc32c
    forged.upload_from_string(b"\0" * victim.size)
    served = len(hub.downloads())

    staged, _ = run(local)

    assert [s.status for s in staged] == ["updated", "unchanged"]
    assert bucket_files(local, MODEL)["tokenizer.json"] == model_files()["tokenizer.json"]
    assert [request.path.rsplit("/", 1)[-1] for request in hub.downloads()[served:]] == ["tokenizer.json"]


def test_a_dropped_download_resumes_with_a_range_request(local, hub, bucket):
    hub.cut_next_download("model-00001-of-00002.safetensors", MiB + 12345)

    staged, _ = run(local)

    assert staged[0].status == "created"
    assert (
        bucket_files(local, MODEL)["model-00001-of-00002.safetensors"]
        == model_files()["model-00001-of-00002.safetensors"]
    )
    ranges = [r.range for r in hub.downloads() if r.path.endswith("model-00001-of-00002.safetensors")]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].removeprefix("bytes=").rstrip("-")) > 0


class CuttingRelay:
    """A TCP relay to the storage emulator that breaks the first upload request carrying more than
    `cut_after` bytes, as a flaky network would: the uploader must ask what Cloud Storage kept."""

    def __init__(self, target: str, cut_after: int) -> None:
        self._target = target.removeprefix("http://").split(":")
        self._cut_after = cut_after
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            upstream = socket.create_connection((self._target[0], int(self._target[1])))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upload: bool) -> None:
        sent = 0
        first = b""
        try:
            while data := source.recv(1 << 16):
                first = first or data[:200]
                sent += len(data)
                if upload and not self.cuts and first.startswith(b"PUT") and sent > self._cut_after:
                    self.cuts += 1
                    sink.sendall(data[: len(data) // 2])
                    break
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            # shutdown, not just close: the other direction's thread is still blocked reading this socket.
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._listener.close()


def test_an_upload_broken_midway_resumes_from_what_cloud_storage_kept(local, hub, bucket, monkeypatch):
    monkeypatch.setattr(transfer, "CHECKPOINT", MiB)
    relay = CuttingRelay(local.emulator.storage_host, cut_after=5 * MiB)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", relay.address)
    try:
        staged, _ = run(local, workers=1)
    finally:
        relay.close()

    assert relay.cuts == 1
    assert staged[0].status == "created"
    assert bucket_files(local, MODEL) == model_files()
    session_requests = [
        entry["outcome"]
        for entry in local.record()
        if entry["method"] == "objects.insert" and "upload_id" in entry["request"]["query"]
    ]
    # The broken PUT (the server kept what arrived), the status query, the PUT that resumed; then the
    # second shard's single PUT.
    assert session_requests == ["RESUME_INCOMPLETE", "RESUME_INCOMPLETE", "OK", "OK"]
    shard = "model-00001-of-00002.safetensors"
    resumed = [r.range for r in hub.downloads() if r.path.endswith(shard)][1]
    assert resumed is not None and int(resumed.removeprefix("bytes=").rstrip("-")) >= MiB


def test_bytes_that_do_not_match_the_published_hash_never_become_an_object(local, hub, bucket):
    hub.repos[("model", MODEL)].files["model-00002-of-00002.safetensors"].served = random_bytes(
        9 * MiB + 77, 99
    )

    with pytest.raises(UserError, match="does not match its published hash"):
        run(local)

    assert "model-00002-of-00002.safetensors" not in bucket_files(local, MODEL)
    assert marker(local, MODEL) is None


def test_files_the_new_revision_dropped_are_removed_and_changed_ones_replaced(local, hub, bucket):
    run(local)
    files = model_files()
    files["config.json"] = b'{"model_type": "gemma3", "hidden_size": 128}'
    del files["model-00002-of-00002.safetensors"]
    commit = hub.add_repo(MODEL, files)
    served = len(hub.downloads())

    staged, _ = run(local)

    assert staged[0].status == "updated"
    assert bucket_files(local, MODEL) == files
    assert marker(local, MODEL)["revision"] == commit
    assert [request.path.rsplit("/", 1)[-1] for request in hub.downloads()[served:]] == ["config.json"]


def test_a_gated_model_points_to_its_licence_page(local, hub, bucket):
    hub.add_repo(MODEL, model_files(), gated=True, granted={TOKEN})
    hub.add_repo("google/gemma-3-27b-it", model_files(), gated=True, granted={TOKEN})

    with pytest.raises(UserError) as raised:
        run(local, token=UNGRANTED, model_source="google/gemma-3-27b-it")
    assert "gated" in raised.value.message
    assert f"{hub.endpoint}/google/gemma-3-27b-it" in raised.value.hint

    with pytest.raises(UserError) as raised:
        run(local, token=None)
    assert "no Hugging Face token" in raised.value.message
    assert f"{hub.endpoint}/{MODEL}" in raised.value.hint
    assert not bucket_files(local, MODEL)

    staged, _ = run(local, token=TOKEN)
    assert staged[0].status == "created"


def test_unknown_repo_revision_and_bad_token_say_so(local, hub, bucket):
    with pytest.raises(UserError, match="acme/nope was not found"):
        run(local, model_source="acme/nope")
    with pytest.raises(UserError, match="Revision v9 of the model acme/gemma-3-tiny-it does not exist"):
        run(local, revision="v9")
    with pytest.raises(UserError, match="rejected HF_TOKEN"):
        run(local, token="hf_NotAToken")
    with pytest.raises(UserError, match="acme/missing-pets was not found"):
        run(local, dataset_source="acme/missing-pets")


def test_a_revision_pins_every_file_to_that_commit(local, hub, bucket):
    old = hub.add_repo(MODEL, model_files(), branch="v1")
    newer = model_files()
    newer["config.json"] = b'{"model_type": "gemma3", "hidden_size": 32}'
    hub.add_repo(MODEL, newer)

    run(local, revision="v1")

    assert bucket_files(local, MODEL)["config.json"] == model_files()["config.json"]
    assert {request.path.split("/resolve/")[1].split("/")[0] for request in hub.downloads()} >= {old}


def test_a_datasets_split_sizes_are_recorded_with_it(local, hub, bucket, tmp_path):
    card = (
        b"---\nlicense: cc-by-sa-4.0\ndataset_info:\n  splits:\n  - name: train\n    num_examples: 3680\n"
        b"  - name: test\n    num_examples: 3669\n---\n# Oxford-IIIT Pet\n"
    )
    hub.add_repo("acme/carded-pets", {**DATASET_FILES, "README.md": card}, repo_type="dataset")
    staged, _ = run(local, dataset_source="acme/carded-pets")
    assert marker(local, staged[1].prefix)["splits"] == {"train": 3680, "test": 3669}
    # A card without split sizes: unknown, so nothing is checked against them.
    assert marker(local, "datasets/oxford-iiit-pet") is None
    run(local)
    assert marker(local, "datasets/oxford-iiit-pet")["splits"] is None

    pets = tmp_path / "pets"
    for name, text in {
        "annotations/list.txt": "#Image CLASS-ID SPECIES BREED-ID\nA_1 1 1 1\nA_2 1 1 1\nA_3 1 1 1\n",
        "annotations/trainval.txt": "A_1 1 1 1\n\nA_2 1 1 1\n",
        "annotations/test.txt": "# comment\nA_3 1 1 1\n",
        "images/A_1.jpg": "jpeg",
    }.items():
        (pets / name).parent.mkdir(parents=True, exist_ok=True)
        (pets / name).write_text(text)
    staged, _ = run(local, dataset_source=str(pets))
    assert marker(local, "datasets/pets")["splits"] == {"train": 2, "test": 1}


def test_local_directories_stage_to_models_and_datasets(local, hub, bucket, tmp_path):
    model_dir = tmp_path / "tiny-gemma"
    (model_dir / ".git").mkdir(parents=True)
    (model_dir / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    model = {"config.json": b"{}", "model.safetensors": random_bytes(9 * MiB + 1, 7), "tokenizer.json": b"{}"}
    for name, content in model.items():
        (model_dir / name).write_bytes(content)
    pets = tmp_path / "pets"
    dataset = {
        "annotations/list.txt": b"Abyssinian_1 1 1 1\n",
        "annotations/trainval.txt": b"Abyssinian_1 1 1 1\n",
        "annotations/test.txt": b"Abyssinian_1 1 1 1\n",
        "images/Abyssinian_1.jpg": random_bytes(5000, 8),
    }
    for name, content in dataset.items():
        (pets / name).parent.mkdir(parents=True, exist_ok=True)
        (pets / name).write_bytes(content)

    staged, _ = run(local, model_source=str(model_dir), dataset_source=f"{pets}/")

    assert [(s.prefix, s.status, s.files) for s in staged] == [
        ("models/tiny-gemma", "created", 3),
        ("datasets/pets", "created", 4),
    ]
    assert bucket_files(local, "models/tiny-gemma") == model
    assert bucket_files(local, "datasets/pets") == dataset
    assert hub.requests == []  # a local source needs no Hub at all

    again, _ = run(local, model_source=str(model_dir), dataset_source=str(pets))
    assert [s.status for s in again] == ["unchanged", "unchanged"]

    (pets / "images" / "Abyssinian_1.jpg").write_bytes(random_bytes(5000, 9))
    changed, _ = run(local, model_source=str(model_dir), dataset_source=str(pets))
    assert [s.status for s in changed] == ["unchanged", "updated"]
    assert bucket_files(local, "datasets/pets")["images/Abyssinian_1.jpg"] == random_bytes(5000, 9)


def test_local_directories_that_are_not_a_model_or_the_pets_layout_are_refused(local, hub, bucket, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        run(local, model_source=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="Oxford-IIIT Pet layout"):
        run(local, dataset_source=str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        run(local, model_source=str(tmp_path / "absent"))


@pytest.mark.parametrize("name", ["line\nbreak.txt", "/".join(["d" * 250] * 5)])
def test_a_local_file_whose_name_cloud_storage_refuses_stops_staging_before_any_upload(
    local, hub, bucket, tmp_path, name
):
    # https://cloud.google.com/storage/docs/objects#naming: no CR/LF, at most 1024 bytes.
    model_dir = tmp_path / "tiny-gemma"
    model_dir.mkdir()
    (model_dir / "config.json").write_bytes(b"{}")
    (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / name).write_bytes(b"x")
    with pytest.raises(UserError, match="cannot be staged: Cloud Storage object names") as refused:
        run(local, model_source=str(model_dir))
    assert "\n" not in refused.value.message and "Rename the file" in refused.value.hint
    assert uploads(local) == []


def test_missing_bucket_says_run_up_and_dry_run_changes_nothing(local, hub):
    with pytest.raises(UserError) as raised:
        run(local)
    assert "gemma-launch up" in raised.value.hint

    staged, _ = run(local, dry_run=True)
    assert [s.status for s in staged] == ["would create", "would create"]

    local.clients(PROJECT).storage.create_bucket(BUCKET, location="europe-west4")
    staged, _ = run(local, dry_run=True)
    assert [s.status for s in staged] == ["would create", "would create"]
    assert uploads(local) == []
    assert hub.downloads() == []


def test_cloud_staging_needs_an_image_and_a_hub_source(local, hub, bucket, tmp_path):
    with pytest.raises(UserError) as raised:
        run(local, stage_in="cloud")
    assert "none is built yet" in raised.value.message and "gemma-launch up" in raised.value.hint
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="cannot read this machine's files"):
        run(
            local,
            stage_in="cloud",
            image="europe-west4-docker.pkg.dev/p/r/i:t",
            model_source=str(tmp_path / "m"),
        )
    with pytest.raises(UserError, match="Unknown --stage-in"):
        run(local, stage_in="region")
    assert uploads(local) == [] and hub.downloads() == []


def test_prefixes(tmp_path):
    assert staging.model_prefix("google/gemma-3-27b-it") == "google/gemma-3-27b-it"
    assert staging.dataset_prefix("timm/oxford-iiit-pet") == "datasets/oxford-iiit-pet"
    (tmp_path / "my-model").mkdir()
    assert staging.model_prefix(str(tmp_path / "my-model") + "/") == "models/my-model"
    assert staging.dataset_prefix(str(tmp_path / "pets")) == "datasets/pets"


def test_the_cli_stages_and_the_token_never_leaves_for_the_cloud(local, hub, bucket, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    runner = CliRunner()

    result = runner.invoke(main, ["stage", "--model-source", MODEL, "--dataset-source", DATASET])
    assert result.exit_code == 0, result.output
    assert "created" in result.output

    failed = runner.invoke(main, ["stage", "--model-source", MODEL, "--revision", "nope"])
    assert failed.exit_code == 2
    assert "Error:" in failed.output

    record = Path(local.record_path).read_text()
    assert '"storage"' in record
    assert TOKEN not in record
    assert TOKEN not in result.output + failed.output
    for path in local.emulator.data_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 10 * MiB:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_quarter_line_shows_the_share_moved_and_none_comes_once_everything_has():
    out = io.StringIO()
    view = StagingView(Console(file=out, width=200))
    view(TransferStarted("model", "model tiny -> gs://b/models/tiny/", 2, 4000))
    view(BytesMoved("a.bin", 2400))  # passes the 25% and 50% marks at once
    view(BytesMoved("b.bin", 1600))  # the rest, with the 75% mark: "Staged" says it
    view(TransferEnded(4000, 1.0, True))
    assert out.getvalue().splitlines()[1:] == [
        "  model: 60% (2.4 KB of 4.0 KB)",
        "Staged 4.0 KB in 1.0 s (4.0 KB/s)",
    ]


def test_a_quarter_line_never_says_100_percent_before_the_last_bytes_nor_a_rate_for_an_instant():
    out = io.StringIO()
    view = StagingView(Console(file=out, width=200))
    view(TransferStarted("model", "model tiny -> gs://b/models/tiny/", 2, 531_500))
    view(BytesMoved("a.bin", 528_900))  # 99.5 % moved: 2.6 KB still to come
    view(BytesMoved("b.bin", 2_600))
    view(TransferEnded(531_500, 0.01, True))
    assert out.getvalue().splitlines()[1:] == [
        "  model: 99% (528.9 KB of 531.5 KB)",
        "Staged 531.5 KB in under 0.1 s",
    ]


def test_the_cli_shows_a_plan_then_a_line_per_quarter_and_per_file_only_when_verbose(
    local, bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    model, pets = tmp_path / "tiny-model", tmp_path / "pets"
    model.mkdir()
    (model / "config.json").write_text("{}" + " " * 998)
    for index in range(1, 8):
        (model / f"shard-{index}.bin").write_bytes(random_bytes(1000, index))
    pet_files = {"images/pug_1.jpg": b"jpeg"}
    # The official layout's three lists: `stage` refuses a dataset the trainer could not read.
    lists = ("list.txt", "trainval.txt", "test.txt")
    pet_files |= {f"annotations/{name}": b"pug_1 1 1 1\n" for name in lists}
    for name, data in pet_files.items():
        (pets / name).parent.mkdir(parents=True, exist_ok=True)
        (pets / name).write_bytes(data)
    stage = ["stage", "--stage-in", "local", "--model-source", str(model), "--dataset-source", str(pets)]
    runner = CliRunner()

    plan = runner.invoke(main, [*stage, "--dry-run"])
    assert plan.exit_code == 0, plan.output
    lines = plan.output.splitlines()
    assert lines[0] == "Plan (dry run: nothing is transferred, created or changed):"
    assert (
        f"would create  model            gs://{BUCKET}/models/tiny-model/ (8 files, 8.0 KB, " in plan.output
    )
    assert lines[lines.index("Equivalent commands:") + 1] == (
        f"  gcloud storage rsync --recursive {model} gs://{BUCKET}/models/tiny-model"
    )
    assert lines[-1] == "Dry run: nothing was changed."
    assert uploads(local) == []

    staged = runner.invoke(main, stage)
    assert staged.exit_code == 0, staged.output
    # Off a terminal: the quarters of the bytes, not a line per file.
    assert re.findall(r"^  model: (\d+)% \(", staged.output, re.MULTILINE) == ["25", "50", "75"]
    assert "uploaded" not in staged.output

    (model / "shard-3.bin").write_bytes(b"retrained")
    (model / "shard-7.bin").unlink()
    changed = runner.invoke(main, [*stage, "--dry-run"])
    assert "would update  model" in changed.output, changed.output
    assert "1 file to upload (9 B), missing or not intact" in changed.output
    assert "1 file to delete, no longer in the source" in changed.output

    verbose = runner.invoke(main, [*stage, "--verbose"])
    assert verbose.exit_code == 0, verbose.output
    assert re.search(r"^  uploaded shard-3\.bin \(9 B in ", verbose.output, re.MULTILINE), verbose.output
