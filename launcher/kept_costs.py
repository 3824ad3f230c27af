"""When a run whose execution record is gone (`down` deleted its job) started, how long it ran and what it
cost, rebuilt from what it wrote to the bucket.

Cloud Run's record gave a run's start, its tasks' run time and its shape (vCPU, memory, GPU). Without it,
the bucket still keeps the run's results.json (a sweep's: each task's): when the task attempt's process
started and the region Cloud Run ran it in (`started`, `region`, trainer/run_record.py), the wall-clock
seconds of its phases, model load to save (`phases`), the GPU it ran on (`platform`, torch's name of the
device; on the emulator, which runs tasks on its CPU, the --max-memory-gib the launcher gave for the
job's GPU, launcher/job.py) and the time the bucket wrote it. The run lasted from its recorded start to
that write; an older trainer's results.json, which records no start, from the phases' sum before it,
which leaves out the checks and the data's download before the model loads. The cost is that duration
at the prices of the region it records (else the settings') for that GPU with the settings' vCPU and
memory (those of the GPU's default shape when the settings name another GPU). Estimates, and lower
bounds: they leave out the container's start, the optional merge and upload after results.json, and a
retried task's earlier attempts. What a run did not write is not guessed: a results.json without phases
(an older trainer's) or without a GPU, or a failure.json alone, leaves those numbers unknown, and says
why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from launcher import gpus, pricing
from launcher.cloud import Clients
from launcher.pricing import Prices
from launcher.settings import Settings, cpu_count, memory_gib
from launcher.settings_rules import DEFAULT_SHAPES

# How the output says where these numbers come from.
ESTIMATED = (
    "estimated from results.json (its start, else its phases) at its region's prices: a lower bound (no "
    "container start, upload or earlier attempt)"
)
BUDGET_FLAG = "max-memory-gib"


@dataclass(frozen=True)
class Rebuilt:
    """A run's start, run time and cost as its results tell them; None where they cannot."""

    started: datetime | None
    seconds: float | None
    usd: float | None
    missing: str = ""  # why a None above is not known; "" when all are known

    def document(self) -> dict[str, Any]:
        """Under the keys `status --json` gives an execution's."""
        return {
            "started": self.started.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if self.started else None,
            "duration_s": None if self.seconds is None else round(self.seconds),
            "cost_usd": self.usd,
        }


UNKNOWN = "started, duration and cost not known"
NOTHING = Rebuilt(None, None, None, f"{UNKNOWN}: it wrote no results.json")


def recorded_gpu(results: dict[str, Any]) -> str | None:
    """The Cloud Run GPU a results.json was written on: the one its platform line names, else, where the
    trainer saw no GPU (the emulator), the one whose budget the launcher passed; None when neither says."""
    platform = str(results.get("platform") or "")
    # A whole word: "NVIDIA L4 (sm_89)" names an L4, "NVIDIA L40S" does not.
    named = [gpu for gpu, found in gpus.GPUS.items() if re.search(rf"\b{re.escape(found.name)}\b", platform)]
    if named:
        return named[0]
    if platform and "no GPU visible" not in platform:
        return None
    budget = (results.get("settings") or {}).get("flags", {}).get(BUDGET_FLAG)
    by_budget = [gpu for gpu, found in gpus.GPUS.items() if budget is not None and found.memory_gib == budget]
    return by_budget[0] if len(by_budget) == 1 else None


class PerSecond:
    """What one task on a GPU costs a second, at a region's prices (the settings' unless a run recorded
    its own), read once per region and GPU."""

    def __init__(self, clients: Clients, settings: Settings) -> None:
        self.clients, self.settings = clients, settings
        self.known: dict[tuple[str, str], Prices] = {}

    def __call__(self, gpu: str, region: str | None = None) -> float:
        where = (region or self.settings.region, gpu)
        if where not in self.known:
            self.known[where] = pricing.prices(self.clients, *where)
        same = gpu == self.settings.gpu
        cpu, memory = (self.settings.cpu, self.settings.memory) if same else DEFAULT_SHAPES[gpu]
        return self.known[where].per_second(cpu_count(cpu), memory_gib(memory), 1)


def _recorded_start(results: dict[str, Any]) -> datetime | None:
    """When the task attempt that wrote results.json started, as it records it; None for an older
    trainer's (or an unreadable value)."""
    value = results.get("started")
    try:
        started = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return started if started is not None and started.tzinfo is not None else None


def rebuild(results: dict[str, Any] | None, written: datetime | None, per_second: PerSecond) -> Rebuilt:
    """One run's (or one task's) numbers from its results.json, written to the bucket at `written`."""
    if not isinstance(results, dict):
        return NOTHING
    phases = results.get("phases")
    try:
        seconds = sum(float(value) for value in phases.values()) if isinstance(phases, dict) else 0.0
    except (TypeError, ValueError):
        seconds = 0.0
    if not seconds:
        return Rebuilt(
            None, None, None, f"{UNKNOWN}: its results.json records no phases (an older trainer's)"
        )
    started = _recorded_start(results)
    if started is not None and written is not None and written > started:
        seconds = (written - started).total_seconds()
    elif started is None and written is not None:
        started = written - timedelta(seconds=seconds)
    gpu = recorded_gpu(results)
    if gpu is None:
        return Rebuilt(
            started, seconds, None, "cost not known: its results.json names no GPU that Cloud Run offers"
        )
    region = results.get("region")
    return Rebuilt(started, seconds, seconds * per_second(gpu, region if isinstance(region, str) else None))


def combined(tasks: list[Rebuilt], expected: int | None) -> Rebuilt:
    """A sweep's numbers from its tasks' (run side by side): the first start to the last end, the sum of
    their costs; not known when a task's are not, or when fewer tasks wrote results than the grid has."""
    if not tasks:
        return NOTHING
    if expected is not None and len(tasks) < expected:
        return Rebuilt(
            None,
            None,
            None,
            f"{UNKNOWN}: {expected - len(tasks)} of its {expected} tasks wrote no results.json",
        )
    for task in tasks:
        if task.missing or task.started is None or task.seconds is None or task.usd is None:
            return Rebuilt(
                None,
                None,
                None,
                task.missing or f"{UNKNOWN}: a task's results.json has no time it was written",
            )
    first = min(task.started for task in tasks if task.started)
    last = max(
        task.started + timedelta(seconds=task.seconds) for task in tasks if task.started and task.seconds
    )
    return Rebuilt(first, (last - first).total_seconds(), sum(task.usd or 0.0 for task in tasks))
