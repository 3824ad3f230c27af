"""Reading the emulator's request record: which calls changed something."""

from __future__ import annotations


def changes(env) -> list[str]:
    """The calls in the record that changed something, enabling an API included (the record marks each
    call from its method: launcher/emulator/record.py)."""
    return [entry["method"] for entry in env.record() if entry["mutating"]]
