"""gemma-launch: fine-tune Gemma 3 on Cloud Run GPU jobs. The command group, its `Error:`/`Hint:` rendering
and exit codes; the commands are in launcher/commands/, one module each: parse, call, render."""

from __future__ import annotations

import shlex
from typing import Any

import click
from google.api_core import exceptions
from rich.markup import escape

from launcher.cloud_errors import translate
from launcher.commands import (
    cancel,
    doctor,
    down,
    emulator,
    init,
    logs,
    report,
    results,
    run,
    stage,
    status,
    sweep,
    up,
)
from launcher.commands.options import SETTINGS_KEY, Command
from launcher.commands.render import err_console
from launcher.errors import UserError


def _say(error: UserError) -> None:
    # Escaped: messages quote what the user wrote, such as "[trainer]", which is not markup.
    err_console.print(f"[bold red]Error:[/] {escape(error.message)}", soft_wrap=True)
    if error.hint:
        err_console.print(f"[bold]Hint:[/] {escape(error.hint)}", soft_wrap=True)


def _usage_failure(caught: click.UsageError, hint: str | None = None) -> click.exceptions.Exit:
    """Click's usage line, then the house `Error:` / `Hint:` pair in place of its "Try ... for help"."""
    ctx = caught.ctx
    if ctx:
        err_console.print(ctx.get_usage(), markup=False, soft_wrap=True)
    command = ctx.command_path if ctx else "gemma-launch"
    offers = "commands" if ctx and isinstance(ctx.command, click.Group) else "options"
    _say(UserError(caught.format_message(), hint or f"Run `{command} --help` for the {offers}."))
    return click.exceptions.Exit(2)


class Cli(click.Group):
    """Turns a UserError, a click usage error, or any Google API error no step explained, into
    `Error:` / `Hint:` lines and exit status 2, with no traceback."""

    command_class = Command

    def make_context(
        self, info_name: str | None, args: list[str], *rest: Any, **kwargs: Any
    ) -> click.Context:
        # The group's own options (`gemma-launch --bogus`) are parsed here, before invoke.
        given = list(args)  # click's parser consumes the list it parses
        try:
            return super().make_context(info_name, args, *rest, **kwargs)
        except click.NoSuchOption as caught:
            hint = self._misplaced(caught.option_name, given)
            if hint:
                caught.possibilities = []  # click's guess is among the group's own options
            raise _usage_failure(caught, hint) from None
        except click.UsageError as caught:
            raise _usage_failure(caught) from None

    def _misplaced(self, option: str, args: list[str]) -> str | None:
        """The hint for a command's options given before the command (`gemma-launch --config x status`),
        as gcloud and kubectl take them: the same command line with them after the command (the group
        has no option of its own but --help and --version); None when the command named lacks `option`."""
        for at, word in enumerate(args):
            command = self.commands.get(word)
            if command is not None and any(option in param.opts for param in command.params):
                fixed = [word, *args[:at], *args[at + 1 :]]
                return f"Options go after the command: `gemma-launch {shlex.join(fixed)}`."
        return None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as caught:
            raise _usage_failure(caught) from None
        except (UserError, exceptions.GoogleAPICallError, exceptions.RetryError) as caught:
            _say(caught if isinstance(caught, UserError) else translate(caught, ctx.meta.get(SETTINGS_KEY)))
            ctx.exit(2)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gemma-launch")
def main() -> None:
    """Fine-tune Gemma 3 on Cloud Run Jobs GPUs (RTX PRO 6000 or L4).

    \b
    Typical session:
      export PROJECT_ID=my-project
      read -rs HF_TOKEN && export HF_TOKEN   # paste a Hugging Face read token
      gemma-launch init          # optional: write gemma-launch.toml
      gemma-launch up            # provision, build the image, stage weights, create the job
      gemma-launch run --follow  # fine-tune, streaming the logs

    Settings come from defaults < gemma-launch.toml < environment variables (PROJECT_ID, REGION,
    BUCKET_NAME, ...) < flags. Rehearse everything locally with `gemma-launch emulator start`.
    """


for command in (
    init.init,
    up.up,
    doctor.doctor_command,
    run.run_command,
    sweep.sweep_command,
    logs.logs_command,
    status.status,
    results.results,
    report.report,
    cancel.cancel,
    down.down,
    emulator.emulator,
    stage.stage,
):
    main.add_command(command)
