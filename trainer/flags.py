"""The flags of `python -m trainer`, in a module that imports neither torch nor any other training library.

The trainer parses its command line with `parse_args`; gemma-launch imports this module to check every
`run --set KEY=VALUE` and `[trainer]` setting against the same definitions (types, choices, ranges)
before it starts an execution, and to turn a setting into the trainer's arguments (`setting_argv`).
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from trainer import UserError

DESCRIPTION = "python -m trainer: fine-tune Gemma 3 on Oxford-IIIT Pet and evaluate it before and after."


class FlagError(UserError):
    """A command line or setting the trainer's parser refuses: the same on every attempt."""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def batch_size(text: str) -> int | None:
    """None for auto."""
    return None if text == "auto" else positive_int(text)


def gcs_path(text: str) -> str:
    if not text.startswith("gs://") or not text.removeprefix("gs://").split("/")[0]:
        raise argparse.ArgumentTypeError(f"must look like gs://BUCKET[/PREFIX], got {text!r}")
    return text.rstrip("/")


def sweep_grid(text: str) -> dict[str, list[str]]:
    """KEY=V1,V2;KEY2=W1,W2 over the trainer's own flags, each value checked as that flag checks it."""
    from trainer.sweep import parse_grid  # here: trainer/sweep.py builds on this module

    try:
        grid = parse_grid(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    for key, values in grid.items():
        if key == "sweep-grid":
            raise argparse.ArgumentTypeError("a grid cannot set sweep-grid")
        for value in values:
            try:
                setting_argv(key, value)
            except FlagError as error:
                raise argparse.ArgumentTypeError(f"{key}={value}: {error.message}") from None
    return grid


# What each type accepts, in words, for hints.
_EXPECTS: dict[Callable[[str], Any], str] = {
    positive_int: "a positive integer",
    positive_float: "a positive number",
    dropout: "a number from 0 up to (not including) 1",
    batch_size: "auto or a positive integer",
    gcs_path: "a path like gs://BUCKET/PREFIX",
    sweep_grid: "KEY=VALUE,VALUE;KEY=VALUE,... over the trainer's flags",
    int: "an integer",
}
_ARGUMENT = re.compile(r"^argument (?P<flags>[^:]+): ")


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: ...)" after every option, also those without a help text; a default of
    None or a flag's False says nothing and is left out."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and self._shows_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not self._shows_default(action):
            return action.help
        return super()._get_help_string(action)

    @staticmethod
    def _shows_default(action: argparse.Action) -> bool:
        return action.default not in (None, False, argparse.SUPPRESS)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # Not argparse's usage block and exit: main() prints one Error: and one Hint: line, and records
        # them for the task's later attempts (trainer/failure.py).
        raise FlagError(message, self._hint(message))

    def _hint(self, message: str) -> str:
        if match := _ARGUMENT.match(message):
            name = match["flags"].split("/")[0]
            action = self._option_string_actions.get(name)
            if action is not None:
                return f"{name} takes {expects(action)}."
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ").split()[0]
            close = difflib.get_close_matches(unknown.split("=")[0], self._option_string_actions, n=1)
            guess = f"Did you mean {close[0]}? " if close else ""
            return f"{guess}`python -m trainer --help` lists every flag."
        return "`python -m trainer --help` lists every flag and its values."


def build_parser() -> Parser:
    p = Parser(prog="python -m trainer", description=DESCRIPTION, formatter_class=ShowDefaults)
    p.add_argument("--model-id", default="google/gemma-3-4b-it", help="Hub id or local model directory")
    p.add_argument(
        "--dataset",
        default="timm/oxford-iiit-pet",
        help="Hub id, datasets.save_to_disk directory, or a directory in the official Oxford-IIIT Pet layout",
    )
    p.add_argument("--train-size", type=positive_int, default=3680, help="images drawn from trainval")
    p.add_argument("--eval-size", type=positive_int, default=1000, help="images drawn from test")
    p.add_argument("--num-epochs", type=positive_float, default=1.0)
    p.add_argument("--learning-rate", type=positive_float, default=2e-4)
    p.add_argument(
        "--batch-size",
        type=batch_size,
        default="auto",
        help="per-device training batch; auto (GPU): the fastest that fits --max-memory-gib, measured with "
        "probe steps (at most 32); auto on CPU: 8",
    )
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=16,
        help="images per evaluation batch; scoring runs the 37 answers of each image in the same sequence",
    )
    p.add_argument("--lora-r", type=positive_int, default=16)
    p.add_argument("--lora-alpha", type=positive_int, default=32)
    p.add_argument(
        "--lora-dropout",
        type=dropout,
        default=0.05,
        help="dropout on the adapters' inputs, applied inside each adapter with a mask hashed from a seed, "
        "which the backward pass computes again: no masks or dropped copies are kept (a quarter of 27B's "
        "activation memory, docs/benchmarks.md); 0: none",
    )
    p.add_argument("--output-dir", default="output")
    p.add_argument("--gcs-output-path", type=gcs_path, help="gs://BUCKET/PREFIX to upload the outputs to")
    p.add_argument("--merge", action="store_true", help="also write the adapter merged into the base model")
    p.add_argument("--checkpoint-strategy", choices=["steps", "epoch", "no"], default="steps")
    p.add_argument("--save-steps", type=positive_int, default=100)
    p.add_argument("--save-total-limit", type=positive_int, default=2)
    p.add_argument("--logging-steps", type=positive_int, default=10)
    p.add_argument("--hf-token", default=None, help="default: $HF_TOKEN")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--quantization",
        choices=["auto", "fp8", "int8", "4bit", "none"],
        default="auto",
        help="base weights: none = bf16; fp8 = e4m3 storage and FP8 matmuls (GPUs with FP8 tensor cores); "
        "int8 = int8 storage, bf16 compute; 4bit = NF4 (QLoRA). auto: fp8 on Hopper GPUs (H100, H200: "
        "measured faster at 4B and 27B), elsewhere the most precise that leaves half of --max-memory-gib "
        "for activations (4B: bf16, 27B in 85 GiB: int8); CPU runs fp32 (int8 and fp8 also work there)",
    )
    p.add_argument("--eval-method", choices=["score", "generate", "both"], default="score")
    speed = p.add_argument_group(
        "GPU speed levers",
        "Defaults are the fastest configuration measured on real-size Gemma 3 (docs/benchmarks.md). They "
        "change no result beyond rounding, except that --batch-size auto picks the batch. On CPU, compile "
        "and the memory plan are off.",
    )
    speed.add_argument(
        "--max-memory-gib",
        type=positive_float,
        default=85.0,
        help="GPU memory budget: the process is capped at it (or the GPU's size) and the batch / gradient "
        "checkpointing plan fits it; 85 fits a 96 GB RTX PRO 6000 with room to spare",
    )
    speed.add_argument(
        "--gradient-checkpointing",
        nargs="?",
        const="on",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: recompute only as many decoder layers as the memory budget demands (a checkpointed layer "
        "runs its forward twice); on (or the bare flag): every layer; off: none",
    )
    speed.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile each decoder layer (fused norms, GeGLU, RoPE, LoRA), static shapes; compiling "
        "and the memory probes take about a minute at the start (27B on an H200); auto: on for CUDA",
    )
    speed.add_argument(
        "--cache-image-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the frozen vision tower once per image before training and reuse its output in every "
        "epoch and both evaluations (host memory: 256 x hidden bf16 values per image, 2.6 MiB at 27B)",
    )
    speed.add_argument(
        "--compile-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse what earlier executions of the job compiled (torch.compile's cache artifacts, where "
        "layers compile) and the memory plan they measured, from <output-dir>/.cache/warm-start/<key>/, "
        "and store this run's there for the next",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--sweep-grid",
        type=sweep_grid,
        help="KEY=V1,V2;KEY2=W1,W2 (set by `gemma-launch sweep`): task $CLOUD_RUN_TASK_INDEX of the "
        "execution trains one combination of the values, under <run dir>/task-<index>/",
    )
    p.add_argument("--dry-run", action="store_true", help="load and format the data, then exit")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The trainer's flags; a FlagError (message and hint) when argv is not valid."""
    return build_parser().parse_args(argv)


def output_dir(argv: list[str]) -> str | None:
    """--output-dir of a command line the full parser refused (None when it has none, or a bad one), so
    that even a refused command line can be recorded for the task's later attempts."""
    lenient = Parser(add_help=False, allow_abbrev=False)
    lenient.add_argument("--output-dir", default="output")
    try:
        known, _ = lenient.parse_known_args(argv)
    except FlagError:
        return None
    return known.output_dir


def names() -> list[str]:
    """Every flag as a setting is named: its long option without the leading dashes ("learning-rate")."""
    return [_name(action) for action in _actions()]


def expects(action: argparse.Action) -> str:
    """What a flag takes, and its default, in words."""
    if action.nargs == 0:
        what = "no value: it is a switch"
    elif action.choices:
        what = "one of " + ", ".join(str(choice) for choice in action.choices)
    else:
        what = _EXPECTS.get(action.type, "a value")  # type: ignore[arg-type]
    return f"{what} (default {action.default})" if action.default is not None else what


def describe(name: str) -> str:
    """What the flag `name` (as names() gives it) takes, as a setting: true or false for a switch."""
    action = _action(name)
    if action.nargs == 0:
        return f"true or false (default {str(bool(action.default)).lower()})"
    return expects(action)


def setting_argv(name: str, value: Any) -> list[str]:
    """The trainer arguments that give flag `name` the value `value` (a switch takes true or false);
    a FlagError, worded for a setting, when the trainer would refuse them."""
    action = _action(name)
    option = f"--{name}"
    if action.nargs == 0:
        if isinstance(value, bool):
            on = value
        elif str(value).lower() in ("true", "false"):
            on = str(value).lower() == "true"
        else:
            raise FlagError(f"{name} is a switch, got {value!r}", f"Give {name} true or false.")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if on else f"--no-{name}"]
        return [option] if on else []
    argv = [option, _text(value)]
    try:
        parse_args(argv)
    except FlagError as error:
        raise FlagError(
            error.message.removeprefix(f"argument {option}: "), f"{name} takes {describe(name)}."
        ) from None
    return argv


def with_settings(argv: Sequence[str], sets: Mapping[str, Any]) -> list[str]:
    """`argv` with each setting's arguments in place of the ones it had: a switch turned off must also
    remove its earlier `--NAME`, which appending `setting_argv` alone would leave on."""
    result = list(argv)
    for key, value in sets.items():
        for option in (f"--{key}", f"--no-{key}"):
            while option in result:
                index = result.index(option)
                has_value = index + 1 < len(result) and not result[index + 1].startswith("--")
                del result[index : index + (2 if has_value else 1)]
        result += setting_argv(key, value)
    return result


def unknown_name(name: str) -> FlagError | None:
    """None when `name` is a flag; else the error, with the closest flag when one is close."""
    if name in names():
        return None
    close = difflib.get_close_matches(name, names(), n=1)
    guess = f"Did you mean {close[0]}? " if close else ""
    return FlagError(f"the trainer has no flag --{name}", f"{guess}Flags: {', '.join(names())}.")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _actions() -> list[argparse.Action]:
    return [action for action in build_parser()._actions if action.option_strings and action.dest != "help"]


def _name(action: argparse.Action) -> str:
    return next(option for option in action.option_strings if option.startswith("--")).removeprefix("--")


def _action(name: str) -> argparse.Action:
    if problem := unknown_name(name):
        raise problem
    return next(action for action in _actions() if _name(action) == name)
