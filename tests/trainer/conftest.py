"""Session fixtures: one full training run of the tiny Gemma 3 on the synthetic pets (tests/conftest.py
builds both), shared by the tests, and the storage server it uploads to."""

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from gcp_storage_emulator.server import create_server
from google.cloud import storage

from launcher.emulator.access import Access
from launcher.emulator.metadata import MetadataServer
from launcher.emulator.state import State

REPO = Path(__file__).resolve().parents[2]
BUCKET = "gemma-launch-test"
HF_TOKEN_CANARY = "hf_canaryTokenThatMustNeverBePrinted"
EXECUTION = "trainer-job-full"
REGION = "us-central1"  # where the reference run's metadata server says it runs

# 740 train / 222 test images, 235 steps: chance (1/37) to > 0.5 in ~15 s of training on 2 cores.
TRAIN_FLAGS = [
    "--train-size", "740", "--eval-size", "222", "--num-epochs", "5", "--learning-rate", "2e-2",
    "--batch-size", "16", "--eval-batch-size", "32", "--save-steps", "50", "--logging-steps", "10",
    "--eval-method", "both", "--seed", "0", "--device", "cpu",
]  # fmt: skip


# The tiny model gains nothing from a second thread, and OpenMP threads spinning against other processes
# on a shared 2-core machine made single runs several times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@dataclass
class Run:
    output_dir: Path
    run_dir: Path
    stdout: str
    stderr: str
    began: datetime  # just before its process was started
    ended: datetime  # just after it exited
    execution: str = EXECUTION
    region: str = REGION
    bucket: str = BUCKET
    token: str = HF_TOKEN_CANARY


def run_trainer(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        cwd=REPO,
        env={**os.environ, **ONE_THREAD, **(env or {})},
        capture_output=True,
        text=True,
        timeout=540,  # a loaded 2-core machine can slow training several-fold
    )


@pytest.fixture(scope="session")
def trainer_cli() -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m trainer ARGS` from the repository root, with extra environment variables."""
    return run_trainer


@pytest.fixture(scope="session")
def train_flags() -> list[str]:
    return TRAIN_FLAGS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def forward_saving() -> Callable:
    """forward_saving(run) -> (run()'s output, every tensor autograd kept from it for the backward pass)."""
    import torch

    def run_saving(run: Callable):
        saved: list = []

        def keep(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = run()
        return out, saved

    return run_saving


@dataclass
class StorageEmulator:
    host: str
    client: storage.Client


@pytest.fixture(scope="session")
def storage_emulator() -> Iterator[StorageEmulator]:
    """gcp-storage-emulator in this process, with a bucket; a client bound to it."""
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    host = f"http://127.0.0.1:{port}"
    # The client reads STORAGE_EMULATOR_HOST when built, as the trainer's does in its own process.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", host)
        client = storage.Client()
    client.create_bucket(BUCKET)
    yield StorageEmulator(host, client)
    server.stop()


@pytest.fixture(scope="session")
def trained_run(
    tiny_model: Path, pets: Path, storage_emulator: str, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    """The uninterrupted reference run, as a Cloud Run task would do it: merge and upload included, the
    emulator's metadata server telling it its region."""
    output_dir = tmp_path_factory.mktemp("full")
    access = Access(State(tmp_path_factory.mktemp("metadata-state")))
    metadata = MetadataServer(access, "demo-project", "trainer@demo-project.iam.gserviceaccount.com", REGION)
    args = [
        "--model-id",
        str(tiny_model),
        "--dataset",
        str(pets),
        "--output-dir",
        str(output_dir),
        *TRAIN_FLAGS,
    ]
    args += ["--merge", "--gcs-output-path", f"gs://{BUCKET}/runs"]
    env = {
        "CLOUD_RUN_EXECUTION": EXECUTION,
        "CLOUD_RUN_TASK_ATTEMPT": "0",
        "HF_TOKEN": HF_TOKEN_CANARY,
        "STORAGE_EMULATOR_HOST": storage_emulator.host,
        **metadata.environment(),
    }
    metadata.start()
    try:
        began = datetime.now(UTC)
        result = run_trainer(args, env)
        ended = datetime.now(UTC)
    finally:
        metadata.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(output_dir, output_dir / EXECUTION, result.stdout, result.stderr, began, ended)
