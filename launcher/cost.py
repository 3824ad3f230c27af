"""What an execution will cost before it starts, and what a finished one cost.

Estimate = (vCPU, GiB and GPU of the task) x their prices per second (launcher/pricing.py) x the expected
duration; a run is one task, a sweep the sum of its tasks'. The duration is a fixed part (model load,
memory plan, image features, saving and upload) plus training (train size x epochs / samples per second)
plus two evaluations (baseline and final, eval size / samples per second each). The rates come from this
project's own finished executions of the same model on the same GPU (their results.json:
`train.samples_per_s`, and `phases` where the trainer recorded them), those whose record went with a
deleted job included (found in the bucket, their GPU the one results.json names), else from BUILT_IN, which
docs/benchmarks.md measured on an H200, scaled to each Cloud Run GPU by GPU_SCALE.

The actual cost of a finished execution is each task's run time (start to completion) at the same prices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.api_core import exceptions
from google.cloud import run_v2

from launcher import executions, gpus, kept_costs, overrides, past_runs, pricing
from launcher import job as jobs
from launcher import results as run_results
from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.pricing import Prices
from launcher.settings import Settings, cpu_count, memory_gib
from trainer import flags

# docs/benchmarks.md, "ours" rows on an H200: training samples/s; evaluation images/s including its share
# of the image-feature pass (27B: 10.4 as the page derives it; 4B: 1 / (1/54.23 + 0.5/35.5) = 31.4). The
# fixed part is not measured there: load and save of 55 GB (27B) or 8 GB (4B) of weights through the
# bucket mount, guessed at 15 and 5 minutes, which is why a first run's estimate says +-50 %.
BUILT_IN: dict[str, tuple[float, float, float]] = {
    "27b": (9.42, 10.4, 900.0),
    "4b": (59.89, 31.4, 300.0),
}
# Throughput relative to the H200 of the benchmarks, by dense BF16 tensor throughput in NVIDIA's datasheets
# (H200 989 TFLOPS, RTX PRO 6000 Blackwell about 500, L4 121): an assumption until runs are recorded.
GPU_SCALE = {"nvidia-rtx-pro-6000": 0.5, "nvidia-l4": 0.12}
FIRST_RUN_SPREAD = 0.5
HISTORY_LIMIT = 20


@dataclass(frozen=True)
class Rates:
    train_per_s: float  # training samples per second
    eval_per_s: float  # evaluated images per second
    fixed_s: float  # everything that does not grow with the sizes
    basis: str  # where the rates come from, as the output says it
    spread: float  # how sure: +- this fraction


@dataclass(frozen=True)
class Estimate:
    usd: float
    seconds: float
    tasks: int
    rates: Rates
    prices: Prices

    def describe(self) -> str:
        minutes = round(self.seconds / 60)
        tasks = f" x {self.tasks} tasks" if self.tasks > 1 else ""
        return (
            f"≈ ${self.usd:.2f} (about {minutes // 60}h{minutes % 60:02d}m{tasks}; {self.rates.basis}: "
            f"±{self.rates.spread:.0%}; prices: {self.prices.source})"
        )

    def document(self) -> dict[str, Any]:
        return {
            "cost_usd": round(self.usd, 4),
            "duration_s": round(self.seconds),
            "tasks": self.tasks,
            "basis": self.rates.basis,
            "spread": self.rates.spread,
            "price_source": self.prices.source,
        }


def sizes(args: Sequence[str]) -> tuple[int, int, float]:
    """(train size, eval size, epochs) as the trainer reads them from `args`, its defaults included; the
    arguments were checked against the trainer's parser before any estimate (overrides.check_sizes)."""
    parsed = flags.parse_args(list(args))
    return parsed.train_size, parsed.eval_size, parsed.num_epochs


def built_in_rates(gpu: str, model: str) -> Rates:
    found = gpus.identify(model)
    size = next((key for key, value in gpus.MODELS.items() if value == found), "4b")
    train, evaluate, fixed = BUILT_IN[size]
    scale = GPU_SCALE.get(gpu, 0.05)
    return Rates(
        train * scale,
        evaluate * scale,
        fixed,
        f"first run of this model on this GPU, rates from docs/benchmarks.md (H200) x {scale}",
        FIRST_RUN_SPREAD,
    )


def _from_results(found: dict[str, Any], fallback: Rates) -> Rates | None:
    train = found.get("train") or {}
    if not train.get("samples_per_s"):
        return None
    phases = found.get("phases") or {}
    evaluated = 2 * int(found.get("eval_size") or 0)
    eval_s = float(phases.get("baseline_s", 0)) + float(phases.get("final_eval_s", 0))
    fixed_keys = ("load_s", "image_features_s", "memory_plan_s", "save_s")
    has_phases = all(key in phases for key in fixed_keys) and eval_s > 0 and evaluated
    return Rates(
        float(train["samples_per_s"]),
        evaluated / eval_s if has_phases else fallback.eval_per_s,
        sum(float(phases[key]) for key in fixed_keys) if has_phases else fallback.fixed_s,
        "",
        0.0,
    )


def _same_model(recorded: str, model: str) -> bool:
    """Whether a results.json's model_id is the job's --model-id: the same path under the bucket mount
    (the emulator runs tasks with the mount at a local directory)."""
    staged = model.removeprefix(jobs.MOUNT_PATH + "/")
    return recorded == model or (staged != model and recorded.endswith("/" + staged))


def history_rates(clients: Clients, settings: Settings, gpu: str, model: str, fallback: Rates) -> Rates:
    """The mean rates of the job's recent successful executions of `model` on `gpu`, and of the runs the
    bucket keeps of it whose record is gone (those of before `down`), each run counted once; else
    `fallback`."""
    found = []
    recorded: set[str] = set()
    try:
        recent = clients.executions.list_executions(parent=settings.job_name, retry=RETRY)
        for _, execution in zip(range(HISTORY_LIMIT), recent, strict=False):
            recorded.add(executions.short_name(execution.name))
            if not executions.succeeded(execution) or execution.template.node_selector.accelerator != gpu:
                continue
            document = run_results.load(clients, settings, execution.name)
            if document and _same_model(str(document.get("model_id", "")), model):
                rates = _from_results(document, fallback)
                if rates is not None:
                    found.append(rates)
    except exceptions.NotFound:
        pass  # no job: no record of any run, and the bucket may still keep some
    from_bucket = 0
    for document in past_runs.finished(clients, settings, HISTORY_LIMIT, recorded):
        # Without the record, the GPU is the one its results.json names (launcher/kept_costs.py).
        if kept_costs.recorded_gpu(document) == gpu and _same_model(str(document.get("model_id", "")), model):
            rates = _from_results(document, fallback)
            if rates is not None:
                found.append(rates)
                from_bucket += 1
    if not found:
        return fallback
    count = len(found)
    kept = f" ({from_bucket} of them from the bucket, without a record)" if from_bucket else ""
    return Rates(
        sum(r.train_per_s for r in found) / count,
        sum(r.eval_per_s for r in found) / count,
        sum(r.fixed_s for r in found) / count,
        f"from {count} finished run{'s' if count > 1 else ''} of this model on this GPU{kept}",
        0.1 if count >= 3 else 0.2,
    )


def duration_s(rates: Rates, args: Sequence[str]) -> float:
    train_size, eval_size, epochs = sizes(args)
    return rates.fixed_s + train_size * epochs / rates.train_per_s + 2 * eval_size / rates.eval_per_s


def task_price_per_s(task: run_v2.TaskTemplate, prices: Prices) -> float:
    limits = task.containers[0].resources.limits
    return prices.per_second(
        cpu_count(limits.get("cpu", "1")),
        memory_gib(limits.get("memory", "512Mi")),
        int(limits.get("nvidia.com/gpu", "0")),
    )


def estimate(job: run_v2.Job, args: Sequence[str], prices: Prices, rates: Rates) -> Estimate:
    """The cost of one task of `job` with trainer `args`: a run's execution is one task (not the job's
    own count, which a cut-off sweep may have left above 1), a sweep's the sum of its tasks'."""
    seconds = duration_s(rates, args)
    usd = seconds * task_price_per_s(job.template.template, prices)
    return Estimate(usd, seconds, 1, rates, prices)


def check_max_cost(found: Estimate, max_cost: float | None) -> None:
    if max_cost is not None and found.usd > max_cost:
        raise UserError(
            f"The estimated cost {found.describe()} is above --max-cost ${max_cost:.2f}: nothing was "
            "started.",
            "Train on fewer images (--train-size), fewer epochs (--set num-epochs=...), or raise --max-cost.",
        )


def actual_usd(clients: Clients, execution: run_v2.Execution, prices: Prices) -> float | None:
    """What a finished execution cost: each task's start to completion at `prices`; None while it runs
    or when no task started."""
    if not executions.is_done(execution):
        return None
    per_second = task_price_per_s(execution.template, prices)
    seconds = 0.0
    for task in executions.tasks_of(clients, execution.name):
        if task.start_time and task.completion_time:
            seconds += (task.completion_time - task.start_time).total_seconds()
    return seconds * per_second if seconds else None


def _rates(clients: Clients, settings: Settings, gpu: str, model: str) -> Rates:
    """The rates of this job's finished runs of `model` on `gpu`, else the built-in table's."""
    return history_rates(clients, settings, gpu, model, built_in_rates(gpu, model))


def for_job(clients: Clients, settings: Settings, job: run_v2.Job, args: Sequence[str]) -> Estimate:
    """The estimate of a run of `job` (one task) with trainer `args`, at the region's prices for its GPU
    and the rates of this job's finished runs of the same model (else the built-in table)."""
    gpu = job.template.template.node_selector.accelerator
    rates = _rates(clients, settings, gpu, flags.parse_args(list(args)).model_id)
    return estimate(job, args, pricing.prices(clients, settings.region, gpu), rates)


def for_sweep(
    clients: Clients,
    settings: Settings,
    job: run_v2.Job,
    args: Sequence[str],
    combinations: Sequence[Mapping[str, str]],
) -> Estimate:
    """A sweep's estimate: the sum of its tasks', each with its combination's sizes and epochs (the
    rates read once per model); `seconds` is a task's mean duration."""
    gpu = job.template.template.node_selector.accelerator
    prices = pricing.prices(clients, settings.region, gpu)
    rates: dict[str, Rates] = {}
    found = []
    for combination in combinations:
        task_args = overrides.apply(args, combination)
        model = flags.parse_args(task_args).model_id
        if model not in rates:
            rates[model] = _rates(clients, settings, gpu, model)
        found.append(estimate(job, task_args, prices, rates[model]))
    return Estimate(
        sum(one.usd for one in found),
        sum(one.seconds for one in found) / len(found),
        len(found),
        found[0].rates,
        prices,
    )


def price_per_s(clients: Clients, settings: Settings, execution: run_v2.Execution) -> float:
    """What one of the execution's tasks costs a second at the region's prices for its GPU."""
    gpu = execution.template.node_selector.accelerator
    return task_price_per_s(execution.template, pricing.prices(clients, settings.region, gpu))


def actual_costs(
    clients: Clients, settings: Settings, found: Sequence[run_v2.Execution]
) -> list[float | None]:
    """What each finished execution cost in USD (None while it runs), reading each GPU's prices once."""
    known: dict[str, Prices] = {}
    spent = []
    for execution in found:
        gpu = execution.template.node_selector.accelerator
        if gpu not in known:
            known[gpu] = pricing.prices(clients, settings.region, gpu)
        # Unrounded: a short run's cost rounds to $0.0000 at four places; the renderers round for people.
        spent.append(actual_usd(clients, execution, known[gpu]))
    return spent
