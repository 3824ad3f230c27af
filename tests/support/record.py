"""Reading the emulator's request record: which calls changed something."""

from __future__ import annotations

MUTATING_PREFIXES = (
    "Create",
    "Update",
    "Delete",
    "Add",
    "Set",
    "Run",
    "Cancel",
    "Patch",
    "Destroy",
    "Disable",
)
MUTATING_STORAGE = ("insert", "patch", "update", "delete", "setIamPolicy", "compose", "copy", "rewrite")


def is_mutating(entry: dict) -> bool:
    if entry["service"] == "storage":
        return any(word in entry["method"] for word in MUTATING_STORAGE)
    return entry["method"].startswith(MUTATING_PREFIXES)


def changes(env) -> list[str]:
    """The calls in the record that changed something, enabling an API included."""
    return [
        entry["method"]
        for entry in env.record()
        if is_mutating(entry) or entry["method"] in ("EnableService", "BatchEnableServices")
    ]
