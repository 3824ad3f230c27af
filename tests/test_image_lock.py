"""requirements.lock, which the image installs, agrees with pyproject.toml and requirements-image.in."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# The image's platform, as `make lock` resolves for it.
IMAGE = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux"}
IMAGE |= {"platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"}


def image_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["train"]
    lines += (REPO / "requirements-image.in").read_text().splitlines()
    requirements = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return [req for req in requirements if req.marker is None or req.marker.evaluate(IMAGE)]


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (pinned version, hashes)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", (REPO / "requirements.lock").read_text()):
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if match:
            pins[canonicalize_name(match[1])] = (match[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def test_every_requirement_is_pinned_in_the_lock_within_its_specifier() -> None:
    pins = locked()
    disagreements = []
    for requirement in image_requirements():
        name = canonicalize_name(requirement.name)
        if name not in pins:
            disagreements.append(f"{requirement}: not in requirements.lock")
        elif not requirement.specifier.contains(pins[name][0], prereleases=True):
            disagreements.append(f"{requirement}: requirements.lock pins {pins[name][0]}")
    assert not disagreements, "run `make lock`:\n" + "\n".join(disagreements)


def test_every_pin_has_hashes() -> None:
    pins = locked()
    assert len(pins) > 100  # the ML stack and the Google clients, CUDA wheels included
    assert {"torch", "triton", "nvidia-cudnn-cu13"} <= set(pins)
    assert [name for name, (_, hashes) in pins.items() if not hashes] == []
