from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Local]:
    record = tmp_path / "record.jsonl"
    with Emulator(data_dir=tmp_path / "emulator", record=record, gpu_quota=GPU_QUOTA) as emulator:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.storage_host)
        yield Local(emulator, record)
