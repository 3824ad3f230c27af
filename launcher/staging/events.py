"""What staging tells as it goes, for whoever shows it: the CLI on a terminal, the staging job in its log
(launcher/staging/view.py renders both). Byte and file events come from the transfer's worker threads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from launcher.logs import Line


@dataclass(frozen=True)
class Note:
    """A sentence for the reader: where the bytes will flow, which execution stages them."""

    text: str


@dataclass(frozen=True)
class TransferStarted:
    kind: str  # "model" | "dataset"
    label: str  # "<kind> <source> -> gs://<bucket>/<prefix>/"
    files: int
    bytes: int


@dataclass(frozen=True)
class FileStarted:
    path: str
    size: int


@dataclass(frozen=True)
class BytesMoved:
    path: str
    count: int


@dataclass(frozen=True)
class FileDone:
    path: str
    size: int
    seconds: float


@dataclass(frozen=True)
class TransferEnded:
    bytes: int
    seconds: float
    ok: bool  # False: it failed or was interrupted, and the error follows


@dataclass(frozen=True)
class JobLine:
    """A line of the staging job's log, read back through Logging."""

    line: Line


Event = Note | TransferStarted | FileStarted | BytesMoved | FileDone | TransferEnded | JobLine
OnEvent = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener of a caller that shows nothing."""
