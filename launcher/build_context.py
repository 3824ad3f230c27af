"""The build context: a reproducible, secret-free .tar.gz of the source that Cloud Build builds.

What goes in follows .gcloudignore (else .dockerignore) as gcloud reads them, less what is always left out
(version control, environments, credentials); the same tree always gives the same bytes, so
launcher/build.py can tag the image with the archive's hash and never rebuild an unchanged tree.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pathspec

from launcher.errors import UserError

# Left out of every archive whatever the ignore files say (a `!` pattern cannot bring them back):
# version control, local environments, and the usual shapes of credentials.
ALWAYS_EXCLUDED = (
    ".git",
    ".venv",
    "__pycache__",
    ".env",
    ".env.*",
    "*.pem",
    "*.p12",
    "*credentials*.json",
    "*-key.json",
)

# A stand-in Hugging Face token for the emulator: random, so no file of the project can contain it.
REHEARSAL_TOKEN = """export HF_TOKEN=hf_$(python -c 'import secrets; print(secrets.token_hex(17))')"""


@dataclass(frozen=True)
class SourceArchive:
    path: Path
    sha256: str
    files: int
    bytes: int  # size of the .tar.gz


def _ignore_lines(root: Path) -> list[str]:
    """.gcloudignore (with its `#!include:FILE` directive), else .dockerignore, else nothing."""
    gcloudignore = root / ".gcloudignore"
    if gcloudignore.is_file():
        lines = []
        for line in gcloudignore.read_text().splitlines():
            if line.startswith("#!include:"):
                included = root / line.removeprefix("#!include:").strip()
                if not included.is_file():
                    raise UserError(
                        f"{gcloudignore} includes {included}, which does not exist.",
                        "Create it or remove the #!include line.",
                    )
                lines += included.read_text().splitlines()
            else:
                lines.append(line)
        return lines
    dockerignore = root / ".dockerignore"
    if dockerignore.is_file():
        return [_anchored(line) for line in dockerignore.read_text().splitlines()]
    return []


def _anchored(line: str) -> str:
    # .dockerignore patterns are relative to the context root (`*.pyc` is only the top level), while
    # a gitignore pattern without a slash matches at any depth: anchor them to keep Docker's meaning.
    text = line.strip()
    if not text or text.startswith("#"):
        return text
    negated = text.startswith("!")
    body = text.removeprefix("!").lstrip("/")
    return ("!" if negated else "") + "/" + body


def _members(root: Path) -> list[str]:
    """Relative POSIX paths of the files and symlinks to pack, sorted."""
    always = pathspec.GitIgnoreSpec.from_lines(ALWAYS_EXCLUDED)
    user = pathspec.GitIgnoreSpec.from_lines(_ignore_lines(root))

    def excluded(relative: str) -> bool:
        return always.match_file(relative) or user.match_file(relative)

    found = []
    for directory, subdirectories, files in os.walk(root):
        base = Path(directory).relative_to(root).as_posix()
        prefix = "" if base == "." else f"{base}/"
        descend = []
        for name in subdirectories:
            relative = prefix + name
            if (Path(directory) / name).is_symlink():
                files.append(name)
            elif not excluded(relative + "/"):
                descend.append(name)
        subdirectories[:] = descend
        for name in files:
            relative = prefix + name
            mode = (Path(directory) / name).lstat().st_mode
            if (stat.S_ISREG(mode) or stat.S_ISLNK(mode)) and not excluded(relative):
                found.append(relative)
    return sorted(found)


def _contains(path: Path, needles: Sequence[bytes]) -> bool:
    overlap = max(len(needle) for needle in needles) - 1
    tail = b""
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            window = tail + chunk
            if any(needle in window for needle in needles):
                return True
            tail = window[-overlap:] if overlap else b""
    return False


def pack_source(
    root: Path, destination: Path | None = None, *, forbidden: Sequence[str] = ()
) -> SourceArchive:
    """A reproducible .tar.gz of `root`: the same tree gives the same bytes, hence the same sha256.

    Entries are sorted, owners and times zeroed and modes reduced to 644/755, so neither checkout
    time nor umask changes the hash. A file containing any of the `forbidden` strings (the HF token)
    stops the packing with a UserError naming the file. Without `destination`, the archive goes to a
    temporary file that the caller deletes.
    """
    root = root.resolve()
    if not root.is_dir():
        raise UserError(f"Source directory {root} does not exist.", "Run the command from your project.")
    needles = [secret.encode() for secret in forbidden if secret]
    members = _members(root)
    if destination is None:
        handle, name = tempfile.mkstemp(prefix="gemma-launch-source-", suffix=".tar.gz")
        os.close(handle)
        destination = Path(name)
    with (
        destination.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for relative in members:
            path = root / relative
            info = tarfile.TarInfo(relative)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(path)
                info.mode = 0o777
                tar.addfile(info)
                continue
            if needles and _contains(path, needles):
                raise UserError(
                    f"{relative} contains your Hugging Face token; it must not be uploaded with the source.",
                    f"Remove the token from {relative}, or add the file to .gcloudignore. If HF_TOKEN is a "
                    "made-up one for a rehearsal, make up one that no file contains: "
                    f"{REHEARSAL_TOKEN}",
                )
            info.size = path.stat().st_size
            info.mode = 0o755 if mode & 0o111 else 0o644
            with path.open("rb") as file:
                tar.addfile(info, file)
    digest = hashlib.sha256()
    with destination.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return SourceArchive(destination, digest.hexdigest(), len(members), destination.stat().st_size)
