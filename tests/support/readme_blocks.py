"""README.md's fenced blocks and the markers that say how tests/e2e/test_readme.py checks each."""

from __future__ import annotations

import re
from dataclasses import dataclass

MARKER = re.compile(r"<!-- readme-test: ([\w-]+) -->")


@dataclass(frozen=True)
class Block:
    kind: str
    text: str
    line: int  # of the opening fence, 1-based


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with the marker above it ('' when there is none)."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        if not lines[index].startswith("```"):
            index += 1
            continue
        start = index
        end = next(n for n in range(start + 1, len(lines)) if lines[n].startswith("```"))
        above = next((lines[n] for n in range(start - 1, -1, -1) if lines[n].strip()), "")
        marker = MARKER.fullmatch(above.strip())
        blocks.append(Block(marker[1] if marker else "", "\n".join(lines[start + 1 : end]), start + 1))
        index = end + 1
    return blocks
