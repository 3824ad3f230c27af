"""What a step of `up` did to one resource, as every step reports it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    kind: str
    name: str
    status: str  # created | updated | enabled | unchanged | would create | would update | would enable
    command: str = ""  # the equivalent gcloud command, shown by --dry-run
    diff: tuple[str, ...] = ()  # what an update changes, one "field: before -> after" per line
