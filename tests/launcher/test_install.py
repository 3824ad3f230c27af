"""An installed gemma-launch (pip install ., pipx install .), away from any checkout, builds the image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.image_source import PROJECT_FILES

REPO = Path(__file__).resolve().parents[2]
PROJECT = "demo-project"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built as pip builds it for `pip install .`, installed without its dependencies (the
    test's environment has them) into a directory of its own."""
    source = tmp_path_factory.mktemp("source")
    # A copy, so that setuptools' build/ directory is not left in the checkout.
    for name in (*PROJECT_FILES, "setup.py", "MANIFEST.in"):
        shutil.copyfile(REPO / name, source / name)
    for package in ("launcher", "trainer"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True
    )
    (wheel,) = wheels.glob("gemma_launch-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def gemma_launch(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site), "PROJECT_ID": PROJECT, "HF_TOKEN": "hf_" + "x7" * 17}
    return subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_installed_package_is_the_one_that_runs(installed):
    done = subprocess.run(
        [sys.executable, "-c", "import launcher; print(launcher.__file__)"],
        env={**os.environ, "PYTHONPATH": str(installed)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(installed)


def test_an_installed_gemma_launch_builds_the_image_with_its_own_files(installed, local):
    done = gemma_launch(installed, "up", "--skip-stage")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The emulated Cloud Build checks every COPY source against the uploaded context: requirements.lock,
    # pyproject.toml, README.md, launcher/ and trainer/ all came from the installed package.
    assert any(line.split()[:2] == ["created", "image"] for line in done.stdout.splitlines()), done.stdout
    again = gemma_launch(installed, "up", "--skip-stage")
    assert again.returncode == 0, again.stderr[-3000:]
    assert any(line.split()[:2] == ["unchanged", "image"] for line in again.stdout.splitlines()), again.stdout
