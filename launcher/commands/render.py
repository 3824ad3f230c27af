"""Where commands print: stdout and stderr consoles, a change's line, a note."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

# Rich assumes 80 columns when output is not a terminal; logs and CI captures read better unwrapped.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

STATUS_STYLE = {
    "created": "green",
    "enabled": "green",
    "would enable": "cyan",
    "updated": "yellow",
    "unchanged": "dim",
    "would create": "cyan",
    "would update": "cyan",
    "skipped": "dim",
    "deleted": "red",
    "cancelled": "red",
    "would delete": "cyan",
    "would cancel": "cyan",
    "absent": "dim",
    "kept": "dim",
    "not checked": "yellow",
}


def print_change(kind: str, name: str, status: str, diff: tuple[str, ...] | list[str] = ()) -> None:
    style = STATUS_STYLE.get(status, "default")
    console.print(f"[{style}]{status:>12}[/]  {kind:<16} {escape(name)}", soft_wrap=True)
    for line in diff:
        console.print(f"{'':>14}{line}", style=style, markup=False, soft_wrap=True)


def say_fit(line: str | None) -> None:
    if line:
        err_console.print(f"[yellow]Note:[/] {line}", soft_wrap=True)
