"""Reliability figures: the fault campaign over many seeds, plus the rest of tests/reliability.

Each seed starts a fresh emulator with `--faults "UNAVAILABLE=R,DEADLINE_EXCEEDED=0.05,
RESOURCE_EXHAUSTED=0.02,lost=0.1,seed=S"` on every service (storage included) and runs the user's flow
through the CLI: `up` (provision + Cloud Build of a small fake trainer + job), `run --follow`, `logs`,
`results`, then `up` again. It counts what the emulator injected and what crossed the wire, checks every
command's outcome, that nothing was duplicated (from the emulator's state) and that the HF token leaked
nowhere. Then, unless --campaign-only, it runs the other reliability tests (concurrency, Ctrl-C,
preemption, bad input, secrets) with GEMMA_LAUNCH_FIGURES set, so they add their own figures.

    .venv/bin/python bench/reliability.py [--seeds 20] [--runs 3] [--unavailable 0.3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.reliability import faults_spec, run_seed  # noqa: E402

FIGURES_ENV = "GEMMA_LAUNCH_FIGURES"


def campaign(seeds: list[int], unavailable: float = 0.3) -> dict[str, Any]:
    results = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"reliability-{seed}-") as workdir:
            found = run_seed(seed, Path(workdir), unavailable)
        results.append(found)
        print(
            f"seed {seed:>3}: {found.commands} commands, {found.wire_calls} calls, "
            f"{sum(found.injected.values())} faults injected ({dict(found.injected)}), "
            f"{len(found.failures)} failures, {len(found.duplicates)} duplicates, {len(found.leaks)} leaks, "
            f"{found.seconds:.0f} s",
            flush=True,
        )
        for problem in found.failures + found.duplicates + found.leaks:
            print(f"    {problem}", flush=True)
    injected: Counter[str] = Counter()
    for found in results:
        injected.update(found.injected)
    return {
        "faults": faults_spec(0, unavailable).replace(",seed=0", ""),
        "seeds": seeds,
        "commands": sum(found.commands for found in results),
        "wire_calls": sum(found.wire_calls for found in results),
        "injected": dict(injected),
        "retries": sum(injected.values()),
        "failures": sum(len(found.failures) for found in results),
        "duplicates": sum(len(found.duplicates) for found in results),
        "leaks": sum(len(found.leaks) for found in results),
        "problems": [p for found in results for p in found.failures + found.duplicates + found.leaks],
    }


def other_tests(figures: Path, runs: int) -> dict[str, Any]:
    """Run tests/reliability (`runs` times the interrupt and concurrency cases); they append their
    figures as JSON lines to `figures`."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "reliability")],
        cwd=REPO,
        env={**os.environ, FIGURES_ENV: str(figures), "GEMMA_LAUNCH_RELIABILITY_RUNS": str(runs)},
        capture_output=True,
        text=True,
    )
    print(done.stdout[-1500:], flush=True)
    merged: dict[str, Any] = {"pytest_exit": done.returncode}
    if figures.exists():
        for line in figures.read_text().splitlines():
            for key, value in json.loads(line).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    merged[key] = merged.get(key, 0) + value
                elif isinstance(value, list):
                    merged[key] = merged.get(key, []) + value
                else:
                    merged[key] = value
    return merged


def main_(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="how many seeds (1..N)")
    parser.add_argument("--unavailable", type=float, default=0.3, help="UNAVAILABLE rate")
    parser.add_argument("--campaign-only", action="store_true", help="skip the other reliability tests")
    parser.add_argument("--runs", type=int, default=3, help="repeat interrupt/concurrency tests this often")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    figures: dict[str, Any] = {"campaign": campaign(list(range(1, args.seeds + 1)), args.unavailable)}
    if not args.campaign_only:
        with tempfile.TemporaryDirectory() as scratch:
            figures["tests"] = other_tests(Path(scratch) / "figures.jsonl", args.runs)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    tests_ok = figures.get("tests", {}).get("pytest_exit", 0) == 0
    clean = not figures["campaign"]["problems"]
    return 0 if clean and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main_())
