"""Source trees the tests build images from: the files of a program, a Dockerfile whose entrypoint runs
it, and the repository's cloudbuild.yaml, as `up --source` takes them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def image_source(
    root: Path,
    entrypoint: list[str],
    files: Mapping[str, str] | None = None,
    *,
    with_trainer: bool = False,
    env: Mapping[str, str] | None = None,
) -> Path:
    """`root` holding `files` (name -> text), with `with_trainer` a copy of trainer/, and a Dockerfile
    running `entrypoint` with `env` set."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (root / name).write_text(text)
    if with_trainer:
        shutil.copytree(REPO / "trainer", root / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    lines = ["FROM python:3.11-slim", *(f"ENV {key}={value}" for key, value in (env or {}).items())]
    lines += ["WORKDIR /app", "COPY . /app", f"ENTRYPOINT {json.dumps(entrypoint)}"]
    (root / "Dockerfile").write_text("\n".join(lines) + "\n")
    shutil.copy(REPO / "cloudbuild.yaml", root / "cloudbuild.yaml")
    return root
