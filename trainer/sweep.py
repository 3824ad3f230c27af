"""A sweep: one Cloud Run execution whose tasks each train one combination of a grid of settings.

`gemma-launch sweep --grid KEY=V1,V2 ...` gives every task the same argv with `--sweep-grid
"KEY=V1,V2;KEY2=W1,W2"`. Cloud Run gives each task its index, 0 to CLOUD_RUN_TASK_COUNT - 1, in
CLOUD_RUN_TASK_INDEX (https://cloud.google.com/run/docs/container-contract#env-vars): task i trains
combination i in itertools.product's order (the last key varies fastest) and writes under
<run dir>/task-<i>/, so that each task's retries resume its own checkpoints. No torch here: the launcher
imports this module (through trainer/flags.py) to name the combinations.
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Mapping, Sequence

from trainer import flags

KEYS = ";"
VALUES = ","
TASK_INDEX = "CLOUD_RUN_TASK_INDEX"


def parse_grid(text: str) -> dict[str, list[str]]:
    """ "KEY=V1,V2;KEY2=W1" -> {KEY: [V1, V2], KEY2: [W1]}; ValueError when it is not that shape."""
    grid: dict[str, list[str]] = {}
    for part in text.split(KEYS):
        key, sep, values = part.partition("=")
        key = key.strip()
        listed = [value.strip() for value in values.split(VALUES)]
        if not sep or not key or not all(listed):
            raise ValueError(f"{part!r} is not KEY=VALUE,VALUE...")
        if key in grid:
            raise ValueError(f"{key} is given twice")
        grid[key] = listed
    return grid


def format_grid(grid: Mapping[str, Sequence[str]]) -> str:
    return KEYS.join(f"{key}={VALUES.join(values)}" for key, values in grid.items())


def combinations(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination, task index order."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def for_task(
    args: argparse.Namespace, argv: Sequence[str], environ: Mapping[str, str] = os.environ
) -> tuple[argparse.Namespace, int | None]:
    """The task's arguments, its grid combination applied, and its index (None outside a sweep).

    The combination is parsed after argv, by the trainer's own parser: its values win and are checked
    as every other flag is."""
    if args.sweep_grid is None:
        return args, None
    choices = combinations(args.sweep_grid)
    index = int(environ.get(TASK_INDEX, "0"))
    if not 0 <= index < len(choices):
        raise flags.FlagError(
            f"task {index} has no combination: the sweep grid has {len(choices)}",
            "Run a sweep with one task per combination (`gemma-launch sweep` does).",
        )
    return flags.parse_args(task_argv(argv, choices[index])), index


def task_argv(argv: Sequence[str], combination: Mapping[str, str]) -> list[str]:
    """What a task's parser reads: the execution's arguments with its combination's in their place, so
    that they win, switches turned off included (`gemma-launch sweep --dry-run` shows each task these)."""
    return flags.with_settings(argv, combination)
