"""What a step of `up` or `down` did to one resource, as every step reports it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    # up: created | updated | enabled | unchanged | skipped (the job, with no image) | would create |
    # would update | would enable; down: deleted | absent | kept | cancelled (an execution) | would delete |
    # would cancel | not checked (its API is off)
    status: str
    command: str = ""  # the equivalent gcloud command, shown by --dry-run
    diff: tuple[str, ...] = ()  # what an update changes, one "field: before -> after" per line
    # What else the step knows, for a command that shows it (staging: the source, its files and bytes,
    # where the bytes flow; launcher.staging.document).
    detail: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def document(self) -> dict[str, Any]:
        """The change as `--json` shows it."""
        return {
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "command": self.command,
            "diff": list(self.diff),
        }
