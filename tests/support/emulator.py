"""The one way tests and bench/ start the emulator: its state and request record under one directory, and
the environment pointing the launcher's clients at it while it runs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from google.cloud import service_usage_v1

from launcher.apis import REQUIRED
from launcher.cloud import Clients
from launcher.emulator.access import Access
from launcher.emulator.record import read_record
from launcher.emulator.server import Emulator


def emulator_in(workdir: Path, **options: Any) -> Emulator:
    """An emulator, not yet started, keeping its state in workdir/emulator and recording every request to
    workdir/record.jsonl; `options` are Emulator's."""
    return Emulator(data_dir=workdir / "emulator", record=workdir / "record.jsonl", **options)


@contextmanager
def emulated(workdir: Path, env: dict[str, str] | None = None, **options: Any) -> Iterator[Emulator]:
    """A running `emulator_in(workdir, **options)`, with GEMMA_LAUNCH_EMULATOR_HOST, STORAGE_EMULATOR_HOST
    and `env` set until it stops. They go into os.environ itself, not a monkeypatch, because the bench uses
    this outside pytest and subprocesses (the CLI, the emulated tasks) must inherit them."""
    with emulator_in(workdir, **options) as emulator:
        values = {
            "GEMMA_LAUNCH_EMULATOR_HOST": emulator.host,
            "STORAGE_EMULATOR_HOST": emulator.storage_host,
            **(env or {}),
        }
        saved = {name: os.environ.get(name) for name in values}
        os.environ.update(values)
        try:
            yield emulator
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


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
        """What `gcloud services enable` (or a first `up`) leaves: every API gemma-launch calls is on, and
        served once the emulator's API propagation delay has passed."""
        self.clients(project).service_usage.batch_enable_services(
            request=service_usage_v1.BatchEnableServicesRequest(
                parent=f"projects/{project}", service_ids=list(REQUIRED)
            )
        ).result()
        time.sleep(self.emulator.access.api_propagation_s)


@contextmanager
def grants_in_effect_once_refused(access: Access) -> Iterator[None]:
    """Each role granted meanwhile stays out of effect until a check has refused for want of it, then
    takes effect, as minutes later in Google Cloud: every use of a new role meets the delay once, however
    fast or slow this machine runs."""
    access.grant_propagation_s = 3600.0
    stop = threading.Event()

    def propagate() -> None:
        while not stop.wait(0.05):
            access.grants_propagated(set(access.held_back))

    watcher = threading.Thread(target=propagate, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
