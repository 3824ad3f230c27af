"""What a step of `up` or `down` did to one resource, as every step reports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    # up: created | updated | enabled | unchanged | would create | would update | would enable;
    # down: deleted | absent | kept | cancelled (an execution) | would delete | would cancel
    status: str
    command: str = ""  # the equivalent gcloud command, shown by --dry-run
    diff: tuple[str, ...] = ()  # what an update changes, one "field: before -> after" per line
