"""--help as a user reads it, and the shell completion the README documents; no emulator needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.commands.options import SettingOption

PROVISIONING_ONLY = ("--memory", "--cpu", "--build-location", "--repository", "--network", "--secret-id")


def help_of(*command: str, width: int = 100) -> str:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def sections(text: str) -> dict[str, list[str]]:
    """Each help section's title -> the flags its entries start with."""
    found: dict[str, list[str]] = {}
    title = ""
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line.removesuffix(":")
            found[title] = []
        elif title and line.startswith("  -"):
            found[title].append(line.split()[0].rstrip(","))
    return found


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        (["logs"], ["--config", "--project", "--region", "--bucket", "--job"]),
        (["status"], ["--config", "--project", "--region", "--bucket", "--job"]),
        (["cancel"], ["--config", "--project", "--region", "--bucket", "--job"]),
        (["results"], ["--config", "--project", "--region", "--bucket", "--job"]),
        (
            ["run"],
            [
                "--config",
                "--project",
                "--region",
                "--bucket",
                "--job",
                "--gpu",
                "--task-timeout",
                "--zonal-redundancy",
            ],
        ),
        (
            ["sweep"],
            ["--config", "--project", "--region", "--bucket", "--job", "--gpu", "--zonal-redundancy"],
        ),
    ],
)
def test_help_lists_the_commands_own_options_first_then_only_the_settings_it_reads(command, settings):
    text = help_of(*command)
    found = sections(text)
    titles = list(found)
    assert titles[0] == "Options" and titles[1].startswith("Settings"), titles
    assert "--config" not in found["Options"] and "-h" in found["Options"]
    assert found[titles[1]] == settings
    for flag in PROVISIONING_ONLY:
        assert flag not in text


@pytest.mark.parametrize("command", ["report", "results", "logs", "cancel"])
def test_the_execution_argument_is_in_the_usage_line_not_an_option_line(command):
    text = help_of(command)
    assert f" {command} [OPTIONS] [EXECUTION]" in text.splitlines()[0], text
    options = text.split("\nOptions:\n", 1)[1].split("\n\n", 1)[0]
    assert all(line.startswith(("  -", "      ")) for line in options.splitlines()), options


def test_up_and_doctor_offer_every_setting_after_their_own_options():
    for command in ("up", "doctor"):
        found = sections(help_of(command))
        settings = found[next(title for title in found if title.startswith("Settings"))]
        assert set(PROVISIONING_ONLY) <= set(settings), settings
        assert "--dry-run" not in settings
    assert sections(help_of("up"))["Options"][:2] == ["--dry-run", "--json"]


@pytest.mark.parametrize("width", [60, 80, 100, 120])
def test_the_faults_example_wraps_between_its_pairs_never_inside_one(width):
    lines = help_of("emulator", "start", width=width).splitlines()
    for pair in ("'UNAVAILABLE=0.3,", "DEADLINE_EXCEEDED=0.05,", "lost=0.1,", "seed=7'."):
        assert any(pair in line for line in lines), (pair, width)


def test_the_documented_completion_command_prints_a_bash_completion_script():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = 'eval "$(_GEMMA_LAUNCH_COMPLETE=bash_source gemma-launch)"'
    assert documented in readme
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        ["bash", "-c", "_GEMMA_LAUNCH_COMPLETE=bash_source gemma-launch"],
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "_gemma_launch_completion()" in done.stdout
    assert "complete -o nosort -F _gemma_launch_completion gemma-launch" in done.stdout
    # And the script completes: the commands after `gemma-launch `.
    offered = subprocess.run(
        ["gemma-launch"],
        env={
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "_GEMMA_LAUNCH_COMPLETE": "bash_complete",
            "COMP_WORDS": "gemma-launch st",
            "COMP_CWORD": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert offered.stdout.split() == ["plain,stage", "plain,status"]


# Settings with no default: the project must be named; an empty network or subnet means none.
NO_DEFAULT = {"--project", "--network", "--subnet"}


def test_each_setting_flag_says_its_default():
    context = click.Context(main.commands["up"])
    seen = set()
    for param in main.commands["up"].get_params(context):
        if isinstance(param, SettingOption) and param.opts[0] not in NO_DEFAULT:
            _, help_text = param.get_help_record(context)
            assert "default" in help_text, (param.opts, help_text)
            seen.add(param.opts[0])
    assert {"--region", "--bucket", "--job", "--gpu", "--task-timeout", "--max-retries"} <= seen
    text = " ".join(help_of("up", width=200).split())
    assert "--region TEXT Region of the bucket, repository and job (REGION). [default: europe-west4]" in text
    assert "(BUCKET_NAME). [default: <project_id>-gemma3-finetuning]" in text
    assert "off in the tutorial). [default: no-zonal-redundancy]" in text


def test_the_gpu_flag_says_the_l4_is_refused_while_the_image_cannot_use_it():
    text = " ".join(help_of("up", width=200).split())
    assert "nvidia-l4 (24 GB; refused today: its driver cannot run the image's torch)" in text
    refused = CliRunner().invoke(main, ["up", "--gpu", "nvidia-l4", "--project", "my-project", "--dry-run"])
    assert refused.exit_code == 2 and "Error: The image cannot use Cloud Run's L4" in refused.output


def test_run_is_one_training_and_its_help_sends_replicates_to_a_sweep():
    text = " ".join(help_of("run", width=200).split())
    assert (
        "For replicates or several settings at once, run a sweep: `gemma-launch sweep --grid seed=1,2,3`."
        in text
    )
    assert "--tasks" not in sections(help_of("run"))["Options"]
    # N tasks of one run would train the same settings N times into one output directory.
    refused = CliRunner().invoke(main, ["run", "--tasks", "3", "--project", "my-project"])
    assert refused.exit_code == 2 and "Error: No such option '--tasks'" in refused.output


@pytest.mark.parametrize(
    ("argv", "error", "hint"),
    [
        (
            ["run", "--bogus"],
            "Error: No such option '--bogus'",
            "Hint: Run `gemma-launch run --help` for the options.",
        ),
        (
            ["run", "--gpu", "nvidia-a100"],
            "Error: Invalid value for '--gpu': 'nvidia-a100' is not one of",
            "Hint: Run `gemma-launch run --help` for the options.",
        ),
        (
            ["emulator", "start", "--port"],
            "Error: Option '--port' requires an argument.",
            "Hint: Run `gemma-launch emulator start --help`",
        ),
        (
            ["status", "extra"],
            "Error: Got unexpected extra argument (extra)",
            "Hint: Run `gemma-launch status --help`",
        ),
        (
            ["emulator", "stop-it"],
            "Error: No such command 'stop-it'.",
            "Hint: Run `gemma-launch emulator --help` for the commands.",
        ),
        (["--bogus"], "Error: No such option '--bogus'", "Hint: Run `gemma-launch --help` for the commands."),
    ],
)
def test_a_usage_error_ends_with_one_error_line_and_a_hint_and_exits_2(argv, error, hint):
    result = CliRunner().invoke(main, argv, prog_name="gemma-launch")
    lines = result.output.splitlines()
    assert result.exit_code == 2, result.output
    assert lines[0].startswith("Usage: gemma-launch"), result.output
    assert lines[-2].startswith(error) and lines[-1].startswith(hint), result.output
    assert sum(line.startswith("Error:") for line in lines) == 1 and "Try '" not in result.output


@pytest.mark.parametrize(
    ("argv", "fixed"),
    [
        (["--config", "my.toml", "status"], "gemma-launch status --config my.toml"),
        (["--json", "status", "--limit", "2"], "gemma-launch status --json --limit 2"),
        (
            ["--project", "p", "--config=my.toml", "logs", "-f"],
            "gemma-launch logs --project p --config=my.toml -f",
        ),
    ],
)
def test_a_commands_option_given_before_the_command_gets_the_command_line_that_works(argv, fixed):
    # gcloud and kubectl take global flags anywhere: a newcomer writes them first.
    result = CliRunner().invoke(main, argv, prog_name="gemma-launch")
    assert result.exit_code == 2, result.output
    error, hint = result.output.splitlines()[-2:]
    assert error == f"Error: No such option '{argv[0].partition('=')[0]}'.", (
        result.output
    )  # no "Did you mean"
    assert hint == f"Hint: Options go after the command: `{fixed}`."
    assert CliRunner().invoke(main, [*fixed.split()[1:], "--help"]).exit_code == 0
