"""The emulator's persistent state: one JSON document on disk, guarded by one lock.

Resources are kept as the JSON form of the client libraries' own messages, so what a GetX returns is
exactly what a CreateX stored, and a restarted emulator (same --data-dir) answers as before.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class State:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / "state.json"
        self._lock = threading.RLock()
        self._doc: dict[str, dict[str, Any]] = (
            json.loads(self._path.read_text()) if self._path.exists() else {}
        )

    def table(self, name: str) -> dict[str, Any]:
        """A live view of one table; read it inside `transaction()` when consistency matters."""
        with self._lock:
            return self._doc.setdefault(name, {})

    @contextmanager
    def transaction(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Exclusive access to every table; the document is saved when the block exits cleanly."""
        with self._lock:
            yield _Tables(self._doc)
            self._save()

    def _save(self) -> None:
        # Write-then-rename so a killed emulator never leaves a truncated state file behind.
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._doc, indent=1, sort_keys=True))
        os.replace(tmp, self._path)


class _Tables(dict):
    """Tables are created on first use, so services need no schema registration."""

    def __init__(self, doc: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        self._doc = doc

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self._doc.setdefault(name, {})
