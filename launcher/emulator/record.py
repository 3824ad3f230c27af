"""The request record: one JSON line per call that reached the emulator, for tests to assert on.

Each line has the time, the service, the method, whether the method may change something
(`mutating`), the request and the outcome.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

# The verbs of the methods that only read. Google's APIs name a method verb first: the standard Get and
# List (https://google.aip.dev/131, https://google.aip.dev/132), BatchGet (https://google.aip.dev/231),
# and custom read-only verbs (https://google.aip.dev/136) such as AccessSecretVersion,
# TestIamPermissions, WaitOperation and TailLogEntries; the storage JSON API names its methods
# "resource.verb" (buckets.get, objects.list, buckets.getIamPolicy, buckets.testIamPermissions,
# https://cloud.google.com/storage/docs/json_api/v1). Every other method may change something: its reply
# can be lost (faults.py) and tests that expect no change look for it in the record.
_READ_VERBS = ("get", "list", "batchget", "access", "test", "wait", "tail")


def mutates(method: str) -> bool:
    """Whether a call of `method` ("CreateJob", "objects.insert") may change something."""
    return not method.rsplit(".", 1)[-1].lower().startswith(_READ_VERBS)


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
                "mutating": mutates(method),
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
