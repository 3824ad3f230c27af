"""README.md's shell blocks as written: the rehearsal runs against the emulator, the rest must parse.

Each fenced block in README.md has a marker on the line above it, and a block without one fails here,
so none is left out silently:

    <!-- readme-test: emulator -->     "in one shell": run as written, in the background, until Ctrl-C
    <!-- readme-test: run -->          "in another": run as written with bash, in an empty directory,
                                       after the emulator's export lines, as the README says
    <!-- readme-test: parse -->        needs a real project, or is make's: each command is parsed, not run
    <!-- readme-test: demo-output -->  what `make demo` prints; tests/e2e/test_demo.py compares it
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import click
import pytest

from launcher.cli import main
from launcher.settings_sources import ENV_VARS
from tests.support.readme_blocks import Block, readme_blocks

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
KINDS = ("emulator", "run", "parse", "demo-output")
VARIABLES = {*ENV_VARS, "HF_TOKEN"}


BLOCKS = readme_blocks(README.read_text())


def blocks(kind: str) -> list[Block]:
    return [block for block in BLOCKS if block.kind == kind]


def test_every_block_is_marked_and_each_kind_is_there():
    unmarked = [block.line for block in BLOCKS if block.kind not in KINDS]
    assert not unmarked, f"README.md blocks at lines {unmarked} need a marker: <!-- readme-test: KIND -->"
    assert [len(blocks(kind)) for kind in ("emulator", "run", "demo-output")] == [1, 1, 1]
    assert len(blocks("parse")) >= 2  # the two make commands and the tour


# ---- blocks that need a real project: each command must parse -----------------------------------


def commands(block: Block) -> list[list[str]]:
    """The block's simple commands (split at && and line ends), comments dropped."""
    found = []
    for line in block.text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            found.append(words[:cut])
            words = words[cut + 1 :]
    return found


def parse_gemma_launch(args: list[str]) -> None:
    """Parse as `gemma-launch ARGS` would, options, types and arguments, without running the command;
    a [PLACEHOLDER] is an optional argument the reader may leave out."""
    args = [arg for arg in args if not re.fullmatch(r"\[[A-Z_]+\]", arg)]
    command: click.Command = main
    # Contexts get the commands' context_settings as make_context gives them: a bare Context would
    # build (and click caches) each command's help option without -h.
    parent = click.Context(main, info_name="gemma-launch", **main.context_settings)
    while isinstance(command, click.Group):
        sub = command.get_command(parent, args[0]) if args else None
        if sub is None:
            raise click.UsageError(f"{shlex.join(args)}: not a command of {parent.command_path}")
        parent = click.Context(sub, info_name=args[0], parent=parent, **sub.context_settings)
        command, args = sub, args[1:]
    command.make_context(parent.info_name, args, parent=parent.parent)


def check(words: list[str]) -> None:
    program, *args = words
    if program == "gemma-launch":
        parse_gemma_launch(args)
    elif program == "make":
        phony = re.search(r"^\.PHONY:(.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1].split()
        assert set(args) <= set(phony), f"make {args}: the Makefile's targets are {phony}"
    elif program in ("pip", "pipx"):
        assert args[0] == "install"
        (spec,) = [arg for arg in args[1:] if arg != "-e"]
        extras = re.fullmatch(r"\.(?:\[([\w,]+)\])?", spec)
        assert extras, f"{spec}: the README installs the checkout"
        known = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        assert set((extras[1] or "").split(",")) - {""} <= set(known)
    elif program == "export":
        assert {arg.partition("=")[0] for arg in args} <= VARIABLES
    elif program == "read":
        assert args[-1] in VARIABLES
    elif program == "eval" or program.startswith("_GEMMA_LAUNCH_COMPLETE="):
        # Shell completion: the documented variable makes gemma-launch print its script for that shell.
        shell = re.search(r"_GEMMA_LAUNCH_COMPLETE=(bash|zsh|fish)_source gemma-launch\b", shlex.join(words))
        assert shell, f"{shlex.join(words)}: not click's completion command"
        gemma_launch = str(Path(sys.executable).parent / "gemma-launch")
        env = {**os.environ, "_GEMMA_LAUNCH_COMPLETE": f"{shell[1]}_source"}
        done = subprocess.run([gemma_launch], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "_GEMMA_LAUNCH_COMPLETE" in done.stdout, done.stdout + done.stderr
    else:
        pytest.fail(f"{shlex.join(words)}: this test does not know how to check {program!r}; teach it")


@pytest.mark.parametrize(
    "words",
    [words for block in blocks("parse") for words in commands(block)],
    ids=shlex.join,
)
def test_each_command_of_the_blocks_that_need_a_real_project_parses(words):
    try:
        check(words)
    except click.ClickException as error:
        pytest.fail(f"{shlex.join(words)}: {error.format_message()}")


def test_the_parse_check_catches_what_drifts():
    for drifted in (
        ["gemma-launch", "run", "--eval-sise", "10"],
        ["gemma-launch", "run", "--train-size", "many"],
        ["gemma-launch", "lgs"],
        ["gemma-launch", "emulator", "start", "--gpu-quota", "-1"],
    ):
        with pytest.raises(click.ClickException):
            parse_gemma_launch(drifted[1:])
    with pytest.raises(AssertionError):
        check(["pip", "install", "-e", ".[trian]"])
    with pytest.raises(AssertionError):
        check(["export", "PROJECT=my-project"])


# ---- the rehearsal, run as written ---------------------------------------------------------------


def test_the_rehearsal_runs_as_written(tmp_path):
    (emulator_block,), (run_block,) = blocks("emulator"), blocks("run")
    env = {
        **os.environ,
        # `python` and `gemma-launch` are this environment's, as in the shell of a user who installed it.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),  # the emulator's default data directory goes here
    }
    exports = tmp_path / "emulator.out"
    with exports.open("w") as out, (tmp_path / "emulator.err").open("w") as err:
        emulator = subprocess.Popen(
            ["bash", "-c", emulator_block.text], stdout=out, stderr=err, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while len(lines := [x for x in exports.read_text().splitlines() if x.startswith("export ")]) < 2:
            assert emulator.poll() is None, (tmp_path / "emulator.err").read_text()[-3000:]
            assert time.monotonic() < deadline, "the emulator printed no export lines"
            time.sleep(0.1)
        workdir = tmp_path / "rehearsal"
        workdir.mkdir()
        # What the README asks of the reader: run the export lines in another shell, then the block.
        script = "set -e -o pipefail\n" + "\n".join(lines) + "\n" + run_block.text + "\n"
        done = subprocess.run(
            ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        # Ctrl-C, as the README says.
        os.killpg(emulator.pid, signal.SIGINT)
        try:
            emulator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(emulator.pid, signal.SIGKILL)
            emulator.wait()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"Execution gemma3-finetuning-job-\w+ succeeded: 1/1 tasks succeeded", done.stdout)
    assert re.search(r"Accuracy\s*│\s*[\d.]+%\s*│\s*[\d.]+%", done.stdout), done.stdout[-3000:]
    assert not re.search(r"hf_[0-9a-f]{34}", output)  # the made-up token is never shown
