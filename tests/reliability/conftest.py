"""Shared by the reliability tests: the campaign helpers of bench/reliability.py, and a figures sink.

bench/reliability.py runs these tests with GEMMA_LAUNCH_FIGURES=FILE; each test that measures something
(kills survived, steps lost, bad inputs rejected, leaks) appends one JSON line there through `figures`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture
def figures() -> Callable[..., None]:
    """figures(name=value, ...): recorded for docs/reliability.md when the bench runs the tests."""

    def add(**values: object) -> None:
        target = os.environ.get("GEMMA_LAUNCH_FIGURES")
        if target:
            with open(target, "a") as out:
                out.write(json.dumps(values) + "\n")

    return add
