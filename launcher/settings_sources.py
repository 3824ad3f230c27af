"""Where settings come from: defaults < gemma-launch.toml < environment variables < flags, merged into a
validated Settings (load_settings); each error names the flag, variable or toml key that set the bad
value and says what to write instead. Also the commented gemma-launch.toml that `init` writes.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from launcher import overrides
from launcher.errors import UserError
from launcher.gpus import DEFAULT_MODEL, MODELS
from launcher.settings import CONFIG_FILE, PROJECT_PLACEHOLDER, Settings

# Environment variables named as in the Cloud Run GPU fine-tuning tutorial, so its shell set-up works as is.
ENV_VARS: dict[str, str] = {
    "PROJECT_ID": "project_id",
    "REGION": "region",
    "SERVICE_ACCOUNT": "service_account",
    "BUILD_SERVICE_ACCOUNT": "build_service_account",
    "BUCKET_NAME": "bucket",
    "AR_REPO": "repository",
    "SECRET_ID": "secret_id",
    "IMAGE_NAME": "image",
    "JOB_NAME": "job",
}


def find_config(explicit: Path | None) -> Path | None:
    if explicit is not None:
        if not explicit.is_file():
            raise UserError(f"Config file {explicit} does not exist.", "Create one with `gemma-launch init`.")
        return explicit
    # Relative, so messages name it as the user knows it: gemma-launch.toml.
    candidate = Path(CONFIG_FILE)
    return candidate if candidate.is_file() else None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise UserError(
            f"{path} is not valid TOML: {error}.",
            "Fix the line named, or rewrite it with `gemma-launch init --force`.",
        ) from error
    if "hf_token" in document:
        raise UserError(
            f"{path} contains hf_token.",
            "Remove it: the token belongs in the HF_TOKEN environment variable, and from there only in "
            "Secret Manager.",
        )
    return document


def _hf_token_from_environment() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def load_settings(
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    *,
    gpu_region: bool = True,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the four sources and validate; any problem becomes a UserError naming its source.

    `flag_names`: the command-line flag of each field in `flags` (default --field-name).
    `gpu_region=False`: a GPU not offered in the region is left for the caller to report."""
    values: dict[str, Any] = {}
    origin: dict[str, Origin] = {}
    path = find_config(config)
    if path is not None:
        for key, value in _read_config(path).items():
            values[key] = value
            origin[key] = Origin("file", str(path))
    for env_name, field in ENV_VARS.items():
        if os.environ.get(env_name):
            values[field] = os.environ[env_name]
            origin[field] = Origin("env", env_name)
    for field, value in (flags or {}).items():
        if value is None or value == ():
            continue
        if field == "trainer":
            values["trainer"] = {**values.get("trainer", {}), **value}
        else:
            values[field] = value
        name = (flag_names or {}).get(field) or "--" + field.replace("_", "-")
        origin[field] = Origin("flag", name)
    values["hf_token"] = _hf_token_from_environment()
    try:
        settings = Settings.model_validate(values)
    except ValidationError as error:
        raise _explain(error, origin, path) from None
    overrides.check_table(settings.trainer, str(path or "the settings"))
    settings.check_consistency(gpu_region=gpu_region)
    return settings


class Origin:
    """Where a setting's value came from: a flag (--project), an environment variable (PROJECT_ID) or the
    settings file (its path); it words the error and the fix."""

    def __init__(self, kind: Literal["flag", "env", "file"], name: str) -> None:
        self.kind, self.name = kind, name

    def what(self, field: str) -> str:
        if self.kind == "flag":
            return self.name
        if self.kind == "env":
            return f"${self.name}"
        return f"{field} in {self.name}"

    def fix(self, field: str, example: Any) -> str:
        if self.kind == "flag":
            return f"Pass {self.name} {example}" if example != "" else f"Pass {self.name} VALUE"
        if self.kind == "env":
            return f"export {self.name}={example}"
        return f"Write {field} = {_toml_value(example)} in {self.name}"


# Pydantic's words for a value of the wrong type, said as what was expected.
_EXPECTED = {
    "string_type": "text in quotes",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a table ([trainer] with KEY = VALUE lines)",
}


def _explain(error: ValidationError, origin: dict[str, Origin], path: Path | None) -> UserError:
    problem = error.errors()[0]
    field = str(problem["loc"][0]) if problem["loc"] else ""
    if problem["type"] == "missing" and field == "project_id":
        return UserError(
            "No Google Cloud project set.",
            "export PROJECT_ID=your-project, pass --project, or set project_id in gemma-launch.toml.",
        )
    if problem["type"] == "extra_forbidden":
        return _unknown_setting(field, path)
    source = origin.get(field) or Origin("flag", "--" + field.replace("_", "-"))
    value = problem.get("input")
    if problem["type"] in _EXPECTED:
        reason = f"expected {_EXPECTED[problem['type']]}, got {value!r}"
    elif problem["type"] == "literal_error":
        reason = f"{value!r} is not one of {problem['ctx']['expected']}"
    elif problem["type"] == "value_error":  # the field validators above, which name the value
        reason = problem["msg"].removeprefix("Value error, ")
    else:
        reason = f"{problem['msg']}, got {value!r}"
    info = Settings.model_fields[field]
    example = (info.examples or [info.default])[0]
    if problem["type"] == "literal_error" and isinstance(value, str):
        example = _closest(value, re.findall(r"'([^']+)'", problem["ctx"]["expected"]), example)
    about = info.description or ""
    return UserError(
        f"Invalid {source.what(field)}: {reason}.", f"{source.fix(field, example)}. {field}: {about}"
    )


def _closest(value: str, choices: list[str], default: Any) -> Any:
    """The choice the user most likely meant: one that contains what they wrote ("l4"), else the most
    similar, else `default`."""
    containing = [choice for choice in choices if value and value.lower() in choice]
    close = containing or difflib.get_close_matches(value, choices, n=1, cutoff=0.4)
    return close[0] if close else default


def _unknown_setting(field: str, path: Path | None) -> UserError:
    known = [name for name in Settings.model_fields if name != "hf_token"]
    where = path or "the settings"
    if field in overrides.settable():
        return UserError(
            f"Unknown setting {field!r} in {where}: it is a trainer setting.",
            f"Move it under the [trainer] table of {where}.",
        )
    close = difflib.get_close_matches(field, known, n=1)
    guess = f"Did you mean {close[0]}? " if close else ""
    return UserError(f"Unknown setting {field!r} in {where}.", f"{guess}Known settings: {', '.join(known)}.")


def template() -> str:
    """A commented gemma-launch.toml listing every setting with its default."""
    lines = [
        "# gemma-launch settings. Precedence: defaults < this file < environment variables < flags.",
        "# The Hugging Face token is never read from this file: export HF_TOKEN, `gemma-launch up` puts it",
        "# in Secret Manager.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        if name in ("hf_token", "trainer"):
            continue
        env_name = next((env for env, target in ENV_VARS.items() if target == name), None)
        lines.append(f"# {field.description}" + (f" Env: ${env_name}." if env_name else ""))
        default = field.default
        if name == "project_id":
            # Commented, and refused if uncommented as it is: a placeholder must never reach Google.
            lines.append("# Required: uncomment and set, or export PROJECT_ID.")
            lines.append(f'# project_id = "{PROJECT_PLACEHOLDER}"')
        elif name == "bucket":
            lines.append('# bucket = "<project_id>-gemma3-finetuning"')
        elif name in ("cpu", "memory"):
            lines.append(f"# {name} = {_toml_value(Settings.shape_default(name))}")
        elif name == "model_id":
            lines.append(f"# model_id = {_toml_value(MODELS[DEFAULT_MODEL].hub_id)}")
        else:
            lines.append(f"# {name} = {_toml_value(default)}")
        lines.append("")
    lines.append("# Trainer flags for every run (override one run with `gemma-launch run --set KEY=VALUE`):")
    lines.append(
        "# any flag of `python -m trainer --help` but the ones gemma-launch sets: "
        + ", ".join(overrides.LAUNCHER_SET)
        + "."
    )
    lines.append("[trainer]")
    lines.append("# train-size = 1000")
    lines.append("# eval-size = 500")
    lines.append("# learning-rate = 1e-4")
    lines.append("# num-epochs = 1")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return f'"{value}"'
