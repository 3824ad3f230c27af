from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import service_usage_v1

from launcher import gpus
from launcher.apis import REQUIRED
from launcher.cloud import Clients
from launcher.emulator.record import read_record
from launcher.emulator.server import Emulator

# A project whose Cloud Run GPU quota request was granted, with room for two GPU tasks at once (a fresh
# project has none: tests of that case set it to 0 with services["quotas"].set_gpu_quota).
GPU_QUOTA = 2


class Local:
    """A running emulator, with the environment pointing the launcher at it."""

    def __init__(self, emulator: Emulator, record: Path) -> None:
        self.emulator = emulator
        self.record_path = record

    def record(self) -> list[dict]:
        return read_record(self.record_path)

    def clients(self, project: str = "demo-project") -> Clients:
        return Clients(project)

    def enable_apis(self, project: str = "demo-project") -> None:
        """What `gcloud services enable` (or a first `up`) leaves: every API gemma-launch calls is on."""
        self.clients(project).service_usage.batch_enable_services(
            request=service_usage_v1.BatchEnableServicesRequest(
                parent=f"projects/{project}", service_ids=list(REQUIRED)
            )
        ).result()


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Local]:
    """The emulator as a new project is: only Google's default APIs on, the caller its owner."""
    record = tmp_path / "record.jsonl"
    with Emulator(
        data_dir=tmp_path / "emulator", record=record, iam_propagation_s=0.5, gpu_quota=GPU_QUOTA
    ) as emulator:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.storage_host)
        yield Local(emulator, record)


@pytest.fixture
def local(fresh: Local) -> Local:
    """A project whose APIs are on, as `up` leaves it: for tests of one step of the flow."""
    fresh.enable_apis()
    fresh.emulator.access.propagation_s = 0.0  # such tests grant right after creating an account
    fresh.record_path.write_text("")  # tests assert on the calls they make themselves
    return fresh


@pytest.fixture
def l4_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `up` built an image with a CUDA 12 torch for the L4, whose driver (535) the image's CUDA 13
    torch cannot use: for tests of L4 jobs past that refusal (launcher/gpus.py)."""
    monkeypatch.setitem(gpus.IMAGE_CUDA, "nvidia-l4", 12)
