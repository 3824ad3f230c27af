"""A Dockerfile reader: enough of the syntax to check a build context and learn how the image starts.

The emulator has no Docker engine, so a build is a static check: the file parses, every instruction is
one Docker knows, there is a FROM before anything else, COPY/ADD sources exist in the context, and the
exec forms are valid JSON. What the final stage says about starting a container (ENTRYPOINT, CMD,
WORKDIR, ENV) becomes the image's config.

Variables the Dockerfile does not define (e.g. $PATH, which comes from the base image) are left as
`$NAME` in ENV values, so whoever runs the image can expand them from the environment it has.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shlex
from dataclasses import dataclass, field

INSTRUCTIONS = frozenset(
    {
        "ADD",
        "ARG",
        "CMD",
        "COPY",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "FROM",
        "HEALTHCHECK",
        "LABEL",
        "MAINTAINER",
        "ONBUILD",
        "RUN",
        "SHELL",
        "STOPSIGNAL",
        "USER",
        "VOLUME",
        "WORKDIR",
    }
)
_DIRECTIVE = re.compile(r"^#\s*([A-Za-z]+)\s*=\s*(\S*)\s*$")
_HEREDOC = re.compile(r"<<(-?)([\"']?)([A-Za-z_][A-Za-z0-9_]*)\2")
_VARIABLE = re.compile(r"\\\$|\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_REMOTE = re.compile(r"^(?:https?://|git@|git://)")


class DockerfileError(Exception):
    """What docker build would report for this Dockerfile."""


@dataclass
class Instruction:
    line: int
    keyword: str
    arguments: str
    # Paths, relative to the build context, that this COPY/ADD reads from it.
    sources: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.keyword} {self.arguments}"


@dataclass
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    workdir: str = "/"
    env: dict[str, str] = field(default_factory=dict)
    shell: list[str] = field(default_factory=lambda: ["/bin/sh", "-c"])
    user: str = ""  # USER: "" is root

    def copy(self) -> ImageConfig:
        return ImageConfig(
            list(self.entrypoint), list(self.cmd), self.workdir, dict(self.env), list(self.shell), self.user
        )

    def to_json(self) -> dict:
        return {
            "entrypoint": self.entrypoint,
            "cmd": self.cmd,
            "workdir": self.workdir,
            "env": self.env,
            "user": self.user,
        }


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    config: ImageConfig


def _logical_lines(text: str) -> list[tuple[int, str, list[str]]]:
    """(line number, instruction text with continuations joined, heredoc bodies), comments dropped."""
    lines = text.splitlines()
    escape = "\\"
    index = 0
    # Parser directives are only recognised before anything else, comments and blank lines included.
    while index < len(lines) and (directive := _DIRECTIVE.match(lines[index])):
        if directive[1].lower() == "escape":
            if directive[2] not in ("\\", "`"):
                raise DockerfileError(
                    f"Dockerfile parse error line {index + 1}: invalid escape {directive[2]!r}"
                )
            escape = directive[2]
        index += 1
    result = []
    while index < len(lines):
        start = index
        line = lines[index].strip()
        index += 1
        if not line or line.startswith("#"):
            continue
        parts = []
        while line.endswith(escape):
            parts.append(line[: -len(escape)])
            while index < len(lines) and (not lines[index].strip() or lines[index].lstrip().startswith("#")):
                index += 1
            line = lines[index].strip() if index < len(lines) else ""
            index += 1
        parts.append(line)
        joined = " ".join(part.strip() for part in parts if part.strip())
        bodies = []
        for heredoc in _HEREDOC.finditer(joined):
            body = []
            while index < len(lines):
                candidate = lines[index].lstrip("\t") if heredoc[1] else lines[index]
                index += 1
                if candidate == heredoc[3]:
                    break
                body.append(candidate)
            else:
                raise DockerfileError(
                    f"Dockerfile parse error line {start + 1}: unterminated heredoc {heredoc[3]}"
                )
            bodies.append("\n".join(body))
        result.append((start + 1, joined, bodies))
    return result


def _expand(text: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "\\$":
            return "$"
        name = match[1] or match[4]
        value = variables.get(name)
        if match[2] == "-":
            return value if value else match[3]
        if match[2] == "+":
            return match[3] if value else ""
        return value if value is not None else match[0]

    return _VARIABLE.sub(replace, text)


def _exec_form(instruction: Instruction) -> list[str] | None:
    """The JSON array of an exec-form argument, None for the shell form."""
    text = instruction.arguments.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DockerfileError(
            f"line {instruction.line}: invalid JSON in the exec form of {instruction.keyword} ({error.msg}); "
            'write it as a JSON array of double-quoted strings, e.g. ["python", "-m", "app"]'
        ) from None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise DockerfileError(
            f"line {instruction.line}: the exec form of {instruction.keyword} must be a list of strings"
        )
    return value


def _command(instruction: Instruction, config: ImageConfig) -> list[str]:
    exec_form = _exec_form(instruction)
    return exec_form if exec_form is not None else [*config.shell, instruction.arguments]


def _flags(words: list[str]) -> tuple[dict[str, str], list[str]]:
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words


def _env_pairs(instruction: Instruction) -> list[tuple[str, str]]:
    text = instruction.arguments
    first = text.split(None, 1)[0]
    if "=" not in first:
        # The legacy form, `ENV KEY value with spaces`.
        key, _, value = text.partition(" ")
        return [(key, value.strip())]
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise DockerfileError(f"line {instruction.line}: {instruction.keyword}: {error}") from None
    pairs = []
    for word in words:
        key, equals, value = word.partition("=")
        if not equals or not key:
            raise DockerfileError(
                f"line {instruction.line}: {instruction.keyword} names must be KEY=VALUE: {word!r}"
            )
        pairs.append((key, value))
    return pairs


def _copy_sources(instruction: Instruction, variables: dict[str, str]) -> list[str]:
    words = _exec_form(instruction)
    flags, words = _flags(words if words is not None else instruction.arguments.split())
    if len(words) < 2:
        raise DockerfileError(
            f"line {instruction.line}: {instruction.keyword} requires at least two arguments"
        )
    if "from" in flags:
        return []
    sources = [_expand(word, variables) for word in words[:-1]]
    return [
        s
        for s in sources
        if not s.startswith("<<") and not (instruction.keyword == "ADD" and _REMOTE.match(s))
    ]


def parse(text: str, build_args: dict[str, str] | None = None, target: str | None = None) -> Dockerfile:
    """Read a Dockerfile; raises DockerfileError with the reason docker build would give."""
    build_args = build_args or {}
    instructions = []
    for line, joined, _bodies in _logical_lines(text):
        keyword, _, arguments = joined.partition(" ")
        if keyword.upper() not in INSTRUCTIONS:
            raise DockerfileError(f"Dockerfile parse error line {line}: unknown instruction: {keyword}")
        if not arguments.strip():
            raise DockerfileError(
                f"Dockerfile parse error line {line}: {keyword.upper()} requires an argument"
            )
        instructions.append(Instruction(line, keyword.upper(), arguments.strip()))

    global_args: dict[str, str] = {}
    stages: dict[str, ImageConfig] = {}
    config: ImageConfig | None = None
    variables: dict[str, str] = {}
    for instruction in instructions:
        keyword = instruction.keyword
        if config is None and keyword not in ("ARG", "FROM"):
            raise DockerfileError(
                f"line {instruction.line}: {keyword} before any FROM: no build stage in current context"
            )
        if keyword == "ARG":
            name, equals, default = instruction.arguments.partition("=")
            if name in build_args:
                value = build_args[name]
            elif equals:
                value = _expand(default.strip("\"'"), {**global_args, **variables})
            else:
                # Inside a stage, a bare `ARG NAME` brings a global ARG's value into scope.
                value = global_args.get(name, "") if config is not None else ""
            (global_args if config is None else variables)[name] = value
        elif keyword == "FROM":
            if config is not None and target is not None and target.lower() in stages:
                break
            flags, words = _flags(_expand(instruction.arguments, global_args).split())
            if len(words) not in (1, 3) or (len(words) == 3 and words[1].upper() != "AS"):
                raise DockerfileError(f"line {instruction.line}: FROM requires either one or three arguments")
            config = stages[words[0].lower()].copy() if words[0].lower() in stages else ImageConfig()
            variables = dict(config.env)
            if len(words) == 3:
                stages[words[2].lower()] = config
        elif keyword == "ENV":
            assert config is not None
            for key, value in _env_pairs(instruction):
                config.env[key] = variables[key] = _expand(value, variables)
        elif keyword == "USER":
            assert config is not None
            config.user = _expand(instruction.arguments, variables).strip()
        elif keyword == "WORKDIR":
            assert config is not None
            config.workdir = posixpath.normpath(
                posixpath.join(config.workdir, _expand(instruction.arguments, variables))
            )
        elif keyword == "SHELL":
            assert config is not None
            shell = _exec_form(instruction)
            if not shell:
                raise DockerfileError(
                    f"line {instruction.line}: SHELL requires the arguments to be in JSON form"
                )
            config.shell = shell
        elif keyword == "ENTRYPOINT":
            assert config is not None
            config.entrypoint = _command(instruction, config)
            # As in Docker: a new ENTRYPOINT drops the CMD inherited so far.
            config.cmd = []
        elif keyword == "CMD":
            assert config is not None
            config.cmd = _command(instruction, config)
        elif keyword in ("COPY", "ADD"):
            instruction.sources = _copy_sources(instruction, variables)
    if config is None:
        raise DockerfileError("the Dockerfile has no FROM instruction")
    if target is not None:
        if target.lower() not in stages:
            raise DockerfileError(f"target stage {target!r} could not be found")
        config = stages[target.lower()]
    return Dockerfile(instructions, config)


def normalize(path: str) -> str:
    """A context path as archives list it: relative, no ./ prefix, no trailing slash ('' is the root)."""
    normal = posixpath.normpath("/" + path).lstrip("/")
    return "" if normal == "." else normal


def context_paths(names: list[str]) -> set[str]:
    """Every path an archive provides, its files' parent directories included."""
    paths = {""}
    for name in names:
        path = normalize(name)
        while path and path not in paths:
            paths.add(path)
            path = posixpath.dirname(path)
    return paths


def context_has(paths: set[str], source: str) -> bool:
    """Whether a COPY/ADD source (a path or a wildcard) names something in the context."""
    wanted = normalize(source)
    if any(char in wanted for char in "*?["):
        return any(fnmatch.fnmatchcase(path, wanted) for path in paths)
    return wanted in paths
