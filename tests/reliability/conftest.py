"""Shared by the reliability tests: a figures sink (their helpers are in tests/support/reliability.py).

bench/reliability.py runs these tests with GEMMA_LAUNCH_FIGURES=FILE; each test that measures something
(kills survived, steps lost, bad inputs rejected, leaks) appends one JSON line there through `figures`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest


@pytest.fixture
def figures() -> Callable[..., None]:
    """figures(name=value, ...): recorded for docs/reliability.md when the bench runs the tests."""

    def add(**values: object) -> None:
        target = os.environ.get("GEMMA_LAUNCH_FIGURES")
        if target:
            with open(target, "a") as out:
                out.write(json.dumps(values) + "\n")

    return add
