"""Trainer settings, from `run --set KEY=VALUE` and the [trainer] table of gemma-launch.toml: checked against
the trainer's own flags (trainer/flags.py: names, types, choices, ranges) before anything is created or
started, applied to the job's arguments, and the sizes checked against the staged dataset's splits.

gemma-launch sets a few flags itself (LAUNCHER_SET); every other flag of `python -m trainer` is a setting.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from launcher.errors import UserError
from trainer import flags

# Flags the job's arguments get from gemma-launch, and why a setting may not replace them.
LAUNCHER_SET: dict[str, tuple[str, str]] = {
    "model-id": (
        "the job reads the model `gemma-launch up` staged in the bucket",
        "Stage another with `gemma-launch up --model-source DIR_OR_HUB_ID` (or set model_id).",
    ),
    "dataset": (
        "the job reads the dataset `gemma-launch up` staged in the bucket",
        "Stage another with `gemma-launch up --dataset-source DIR_OR_HUB_ID` (or set dataset_id).",
    ),
    "output-dir": (
        "each execution writes to gs://BUCKET/runs/<execution>/, where `gemma-launch results` reads",
        "Leave it out; copy the outputs from there (`gemma-launch results` lists them).",
    ),
    "device": (
        "the job runs on its GPU (cuda), or on the CPU with --gpu none",
        "Choose the hardware with --gpu when running `gemma-launch up`.",
    ),
    "sweep-grid": (
        "`gemma-launch sweep` sets it from its --grid options",
        "Run `gemma-launch sweep --grid KEY=VALUE,VALUE ...` to train one task per combination.",
    ),
    "hf-token": (
        "the token reaches the job only from Secret Manager, never as an argument",
        "export HF_TOKEN=hf_... and run `gemma-launch up`: it updates the secret.",
    ),
}
SIZES = (("train-size", "train"), ("eval-size", "test"))


def settable() -> list[str]:
    """The trainer's flags a user may set, named as `--set` and [trainer] take them."""
    return [name for name in flags.names() if name not in LAUNCHER_SET]


def check(key: str, value: Any, where: str) -> list[str]:
    """The trainer arguments for one setting; a UserError, saying `where` it came from (e.g.
    "--set learning-rate=abc"), when the trainer would refuse it."""
    if key in LAUNCHER_SET:
        why, hint = LAUNCHER_SET[key]
        raise UserError(f"{where}: {key} is not a setting: {why}.", hint)
    if key not in settable():
        close = difflib.get_close_matches(key, settable(), n=1)
        guess = f"Did you mean {close[0]}? " if close else ""
        raise UserError(
            f"Unknown trainer setting {key!r} ({where}).", f"{guess}Settings: {', '.join(settable())}."
        )
    try:
        return flags.setting_argv(key, value)
    except flags.FlagError as error:
        raise UserError(f"Invalid {where}: {error.message}.", error.hint) from None


def parse_sets(pairs: Sequence[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs -> {KEY: VALUE}, each checked by the trainer's own parser."""
    sets = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key:
            raise UserError(f"--set {pair!r} is not KEY=VALUE.", "Example: --set learning-rate=1e-4")
        check(key, value, f"--set {key}={value}")
        sets[key] = value
    return sets


def check_table(table: Mapping[str, Any], path: str) -> None:
    """The [trainer] table of a settings file."""
    for key, value in table.items():
        check(key, value, f"{key} = {value!r} in [trainer] of {path}")


def apply(args: Sequence[str], sets: Mapping[str, Any]) -> list[str]:
    """`args` with each setting's arguments in place of the ones it had (settings checked before): the
    trainer's own rule, which a sweep's task applies to its combination."""
    return flags.with_settings(args, sets)


def too_large(
    args: Sequence[str], splits: Mapping[str, int], only: Sequence[str] | None = None
) -> dict[str, tuple[int, int]]:
    """The size settings of the trainer's arguments (or its defaults) that are larger than the staged
    dataset's split they draw from: {setting: (its size, the split's)}; `only`: the settings to look at."""
    try:
        parsed = flags.parse_args(list(args))
    except flags.FlagError as error:
        raise UserError(
            f"The job's trainer arguments are not valid for this gemma-launch: {error.message}.",
            "Run `gemma-launch up` to write them again.",
        ) from None
    found = {}
    for key, split in SIZES:
        size, available = getattr(parsed, key.replace("-", "_")), splits.get(split)
        if (only is None or key in only) and isinstance(available, int) and size > available:
            found[key] = (size, available)
    return found


def check_sizes(
    args: Sequence[str],
    splits: Mapping[str, int],
    dataset: str,
    only: Sequence[str] | None = None,
    grid: Sequence[str] | None = None,
) -> None:
    """--train-size and --eval-size of the trainer's arguments (or its defaults) against the split sizes
    recorded when the dataset was staged (launcher/staging/bucket.py); `only`: the size settings to check;
    `grid`: a sweep's grid settings, so that the hint names the flag of `sweep` that sets the size. Both
    sizes are named in one error, so that one corrected command fits (a small dataset misses both
    defaults)."""
    large = too_large(args, splits, only)
    if not large:
        return
    problems = []
    for key, (size, available) in large.items():
        default = "" if f"--{key}" in args else " (the trainer's default)"
        drawn = "trainval (train)" if key == "train-size" else "test"
        where = f"of the staged dataset {dataset} " if not problems else ""
        problems.append(f"{key} {size}{default} is larger than the {drawn} split {where}({available} images)")
    hints = [
        f"Give --grid {key}= values of {available} or less."
        for key, (_, available) in large.items()
        if grid is not None and key in grid
    ]
    fixed = {key: available for key, (_, available) in large.items() if grid is None or key not in grid}
    if fixed:
        limits = " and ".join(
            f"{available} or less" if len(fixed) == 1 else f"{key} {available} or less"
            for key, available in fixed.items()
        )
        sets = " ".join(f"--set {key}={available}" for key, available in fixed.items())
        toml = " and ".join(f"{key} = {available}" for key, available in fixed.items())
        how = f"run {sets}` for one run" if grid is None else f"sweep {sets}` for every task"
        hints.insert(
            0,
            f"Use {limits}: `gemma-launch {how}, or {toml} in [trainer] of gemma-launch.toml for every run.",
        )
    raise UserError("; ".join(problems) + ".", " ".join(hints))
