"""The directory the job's image is built from: the Dockerfile and cloudbuild.yaml beside the packages.

From a checkout (or an editable install) that is the checkout itself. An installed gemma-launch (`pip
install .`, `pipx install .`) has no checkout: its wheel carries the project's top-level files that a
build needs in launcher/_project/ (setup.py puts them there), and `located()` lays the same tree out
again in a temporary directory, so the build sees what it would see in the checkout.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from launcher.errors import UserError

# Everything the Dockerfile COPYs from outside the packages, plus what decides how the source is packed
# and built. setup.py copies these into the wheel.
PROJECT_FILES = (
    "Dockerfile",
    "cloudbuild.yaml",
    ".dockerignore",
    ".gcloudignore",
    "requirements.lock",
    "pyproject.toml",
    "README.md",
)
PACKAGED = "_project"
PACKAGES = ("launcher", "trainer")

_CHECKOUT = Path(__file__).resolve().parent.parent


def _is_build_source(root: Path) -> bool:
    return all((root / name).is_file() for name in ("Dockerfile", "cloudbuild.yaml")) and all(
        (root / package).is_dir() for package in PACKAGES
    )


@contextmanager
def located(source: Path | None = None) -> Iterator[Path]:
    """`source` if given, else the checkout this gemma-launch runs from, else a copy of the tree the
    installed package carries (removed on exit)."""
    if source is not None:
        yield source
        return
    if _is_build_source(_CHECKOUT):
        yield _CHECKOUT
        return
    carried = resources.files("launcher") / PACKAGED
    if not all(carried.joinpath(name).is_file() for name in PROJECT_FILES):
        raise UserError(
            f"This gemma-launch has neither a checkout around it ({_CHECKOUT}) nor the build files its "
            "package should carry (Dockerfile, cloudbuild.yaml, requirements.lock).",
            "Pass --source with a checkout of gemma-launch, or reinstall from one: pip install . (or pipx "
            "install .) there.",
        )
    with tempfile.TemporaryDirectory(prefix="gemma-launch-image-") as directory:
        root = Path(directory)
        for name in PROJECT_FILES:
            (root / name).write_bytes(carried.joinpath(name).read_bytes())
        for package in PACKAGES:
            shutil.copytree(
                _CHECKOUT / package,
                root / package,
                ignore=shutil.ignore_patterns("__pycache__", PACKAGED),
            )
        yield root
