"""The request record: one JSON line per call that reached the emulator, for tests to assert on."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class Record:
    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()

    def append(self, service: str, method: str, request: Any, *, outcome: str = "OK") -> None:
        if self._path is None:
            return
        line = json.dumps(
            {
                "time": time.time(),
                "service": service,
                "method": method,
                "request": request,
                "outcome": outcome,
            },
            sort_keys=True,
        )
        with self._lock, self._path.open("a") as out:
            out.write(line + "\n")


def read_record(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
