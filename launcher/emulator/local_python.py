"""Whether this machine's Python can run an image's `python -m PACKAGE` command.

The emulator runs a task's Python command with its own interpreter (there is no container), so the
image's dependencies must be installed here: for the trainer, gemma-launch's `train` extra. Rather than
let every attempt die on an ImportError, the execution fails before its first task, saying so.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path


def _module(argv: list[str]) -> str | None:
    """PACKAGE[.MODULE] of `python -m PACKAGE[.MODULE] ...`, else None."""
    if len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m":
        return argv[2]
    return None


def _imported(directory: Path) -> set[str]:
    """Top-level names that the package's modules import when loaded (not those imported lazily)."""
    names: set[str] = set()
    for path in sorted(directory.glob("*.py")):
        for node in ast.parse(path.read_bytes(), str(path)).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def missing_modules(argv: list[str], snapshot: Path) -> tuple[str, list[str]]:
    """(package, modules its code imports that this Python cannot find), for a `python -m` command."""
    module = _module(argv)
    if module is None:
        return "", []
    package = module.split(".")[0]
    directory = snapshot / package
    if not directory.is_dir():
        return package, []
    local = {path.name for path in snapshot.iterdir() if path.is_dir()}
    needed = _imported(directory) - set(sys.stdlib_module_names) - local - {"__future__"}
    return package, sorted(name for name in needed if importlib.util.find_spec(name) is None)


def check(argv: list[str], snapshot: Path) -> str:
    """'' when `argv` can run here, else an Error/Hint naming what to install."""
    importlib.invalidate_caches()  # what was installed since the emulator started counts
    package, missing = missing_modules(argv, snapshot)
    if not missing:
        return ""
    if package == "trainer":
        hint = (
            "Rehearsing runs the trainer on this machine, so it needs gemma-launch's train extra: "
            "pip install -e '.[train]' in the checkout, or pipx install --force '.[train]' (then restart "
            "the emulator); make demo installs it."
        )
    else:
        hint = f"Install {', '.join(missing)} for {sys.executable}."
    return (
        f"Error: python -m {_module(argv)} imports {', '.join(missing)}, which {sys.executable} lacks: the "
        "emulator runs a task's Python command with its own Python.\n"
        f"Hint: {hint} Then run again."
    )
