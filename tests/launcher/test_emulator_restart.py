"""An emulator restarted on the same --data-dir keeps working, wherever its new ports land."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from click.testing import CliRunner

from launcher.cli import main
from launcher.cloud import Clients
from launcher.emulator.server import Emulator

PROJECT = "demo-project"
BUCKET = f"{PROJECT}-gemma3-finetuning"


def _point_at(emulator: Emulator, monkeypatch) -> None:
    monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.storage_host)


def _free_port_other_than(taken: int) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            if sock.getsockname()[1] != taken:
                return sock.getsockname()[1]


def _up(model: Path, dataset: Path) -> str:
    sources = ["--stage-in", "local", "--model-source", str(model), "--dataset-source", str(dataset)]
    result = CliRunner().invoke(main, ["up", "--skip-build", *sources])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_restarted_emulator_serves_what_it_stored_on_its_new_ports(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_0123456789abcdef")
    model, dataset = tmp_path / "tiny-model", tmp_path / "pets"
    for path, text in {
        model / "config.json": "{}",
        dataset / "annotations" / "list.txt": "Abyssinian_1 1 1 1\n",
        dataset / "annotations" / "trainval.txt": "Abyssinian_1 1 1 1\n",
        dataset / "annotations" / "test.txt": "Abyssinian_1 1 1 1\n",
        dataset / "images" / "Abyssinian_1.jpg": "jpeg",
    }.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    data_dir = tmp_path / "emulator"
    with Emulator(data_dir=data_dir) as first:
        _point_at(first, monkeypatch)
        assert "created" in _up(model, dataset)
        Clients(PROJECT).storage.bucket(BUCKET).blob("notes/a.txt").upload_from_string(b"kept")
        old_port = first.storage_port

    with Emulator(data_dir=data_dir, storage_port=_free_port_other_than(old_port)) as second:
        _point_at(second, monkeypatch)
        started = time.monotonic()
        blob = Clients(PROJECT).storage.bucket(BUCKET).get_blob("notes/a.txt")
        # No retry: a link to the old port would fail at once rather than after two minutes of retries.
        assert blob.download_as_bytes(retry=None, timeout=5) == b"kept"
        # Staging reads back what it staged before (its completion markers) and finds it complete.
        assert "created" not in _up(model, dataset)
        assert time.monotonic() - started < 30


def test_a_stopped_emulator_is_reported_at_once_with_how_to_start_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    with Emulator(data_dir=tmp_path / "emulator") as stopped:
        _point_at(stopped, monkeypatch)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # a model directory: `stage` checks its sources first
    for command in (["status"], ["stage", "--stage-in", "local", "--model-source", str(model)]):
        started = time.monotonic()
        result = CliRunner().invoke(main, command)
        assert time.monotonic() - started < 5, command
        assert result.exit_code == 2, result.output
        assert "Error: The gemma-launch emulator is not running: nothing answers at " in result.output
        assert (
            f"`gemma-launch emulator start --port {stopped.port} --storage-port {stopped.storage_port}`"
            in result.output
        ), result.output
        assert "Traceback" not in result.output


def test_a_second_emulator_on_a_port_in_use_is_refused_instead_of_sharing_it(fresh, tmp_path):
    # gRPC's default SO_REUSEPORT let a second emulator bind the first's port: each then answered some
    # calls from its own state. The storage port, bound in a thread, left the second waiting forever.
    running = fresh.emulator
    for flag, port in (("--port", running.port), ("--storage-port", running.storage_port)):
        second = CliRunner().invoke(
            main, ["emulator", "start", "--data-dir", str(tmp_path / "second"), flag, str(port)]
        )
        assert second.exit_code == 2, second.output
        assert second.stderr.splitlines()[-2:] == [
            f"Error: Port {port} ({flag}) is in use on 127.0.0.1, by another emulator or another program.",
            f"Hint: Stop that one (Ctrl-C in its shell), or leave out {flag} for a free port.",
        ]
    assert Clients(PROJECT).storage.lookup_bucket(BUCKET) is None  # the first still answers
