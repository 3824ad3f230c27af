"""The GPU memory budget, and batches planned against it from measured passes: a batch size and
gradient-checkpointing plan for training, a batch for each no-grad pass (image features, evaluation).

docs/benchmarks.md ("GPU training and evaluation") has the numbers behind each default.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from trainer.speed.layers import decoder_layers, set_checkpointed_layers

log = logging.getLogger(__name__)

GIB = 2**30

# Share of the budget the plan leaves unused: the allocator's fragmentation and the kernels' workspaces.
MEMORY_MARGIN = 0.07
# Largest batch the plan picks: more only shortens the run's step count, at a throughput already flat.
MAX_AUTO_BATCH = 32
# What measure_peak reports for a probe that ran out of memory: more than any budget.
RAN_OUT = 1 << 50
# The host's time per training step (running each layer's Python, launching its kernels and the adapters'
# ops), in units of one sample's forward pass on the GPU (its backward costs as much). The GPU runs ahead
# of the host only up to the host's pace, so a step takes the longer of the two. Fitted to 27B runs whose
# small batches waited for the host (docs/benchmarks.md, "Memory plan"); where the GPU's work is the longer,
# as it now is at the batches that fit, the value only keeps the plan from small batches with heavy
# checkpointing.
HOST_STEP_PASSES = 15.0


def memory_budget(max_memory_gib: float, device: str) -> int:
    """The budget in bytes: --max-memory-gib, or the GPU's size where that is smaller (an L4 under 85)."""
    return min(_gpu_bytes(device), int(max_memory_gib * GIB))


def apply_memory_budget(max_memory_gib: float, device: str) -> int:
    """Cap this process's GPU memory at the budget (or the GPU's size) and return the cap in bytes.

    The cap makes a larger GPU fail like the smaller target GPU would, instead of quietly using more.
    """
    budget = memory_budget(max_memory_gib, device)
    torch.cuda.set_per_process_memory_fraction(budget / _gpu_bytes(device), _gpu_index(device))
    return budget


def _gpu_index(device: str) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def _gpu_bytes(device: str) -> int:
    return torch.cuda.get_device_properties(_gpu_index(device)).total_memory


@dataclass
class Plan:
    batch_size: int
    checkpointed_layers: int
    # Measured: bytes per sample with no layer checkpointed, bytes a checkpointed layer saves per sample,
    # bytes that do not grow with the batch; the budget left after the weights.
    per_sample: int = 0
    per_layer_saving: int = 0
    fixed: int = 0
    available: int = 0

    def describe(self) -> str:
        return (
            f"batch {self.batch_size}, gradient checkpointing on {self.checkpointed_layers} layers "
            f"(per sample {self.per_sample / GIB:.2f} GiB, a checkpointed layer saves "
            f"{self.per_layer_saving / GIB:.3f} GiB per sample, {self.available / GIB:.1f} GiB available)"
        )


def choose_plan(
    num_layers: int,
    per_sample: int,
    per_layer_saving: int,
    fixed: int,
    available: int,
    batch_size: int | None,
    checkpointing: str,
) -> Plan:
    """The batch and checkpointed-layer count with the best estimated throughput that fit `available`.

    Time per step, in units of one sample's forward or backward pass: the GPU's, 2 per sample plus 1 per
    sample for each checkpointed layer's share of the model (its forward runs twice), or the host's,
    HOST_STEP_PASSES plus half again for each checkpointed layer's share, whichever is longer. The cost is
    that time per sample.
    """
    batches = [batch_size] if batch_size else range(1, MAX_AUTO_BATCH + 1)
    best: tuple[tuple[float, int], Plan] | None = None
    for batch in batches:
        if checkpointing == "off":
            counts = [0]
        elif checkpointing == "on":
            counts = [num_layers]
        else:
            excess = fixed + batch * per_sample - available
            needed = 0 if excess <= 0 else math.ceil(excess / max(batch * per_layer_saving, 1))
            counts = [needed] if needed <= num_layers else []
        for count in counts:
            fits = fixed + batch * (per_sample - count * per_layer_saving) <= available
            if not fits and not (batch_size and checkpointing != "auto"):
                continue
            gpu = batch * (2 + count / num_layers)
            host = HOST_STEP_PASSES * (1 + count / (2 * num_layers))
            # At equal cost the larger batch: fewer steps, so fewer optimizer steps and synchronizations.
            cost = (max(gpu, host) / batch, -batch)
            plan = Plan(batch, count, per_sample, per_layer_saving, fixed, available)
            if best is None or cost < best[0]:
                best = (cost, plan)
    if best is None:
        raise MemoryError(
            f"no batch fits: {fixed / GIB:.1f} GiB fixed + {per_sample / GIB:.2f} GiB per sample "
            f"(all layers checkpointed: {(per_sample - num_layers * per_layer_saving) / GIB:.2f}) "
            f"> {available / GIB:.1f} GiB available"
        )
    return best[1]


def measure_peak(run: Callable[[], object]) -> int:
    """Peak bytes `run()` adds to what is allocated now; a huge number when it runs out of memory."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        run()
        fitted = True
    except torch.OutOfMemoryError:
        fitted = False
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    torch.cuda.empty_cache()
    return peak if fitted else RAN_OUT


def probe_steps(
    model: PreTrainedModel, step: Callable[[list[dict]], None], examples: list[dict], run: Callable
) -> tuple:
    """The probes' three steps, each through `run`: 1 and 2 samples, then 2 with every layer checkpointed."""
    layers = len(decoder_layers(model))
    # The probes draw dropout masks: restore the generators, so training sees the same randomness as
    # without a plan.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        set_checkpointed_layers(model, 0)
        one = run(lambda: step(examples[:1]))
        two = run(lambda: step(examples[:2]))
        set_checkpointed_layers(model, layers)
        two_checkpointed = run(lambda: step(examples[:2]))
    return one, two, two_checkpointed


def compile_as_probes(
    model: PreTrainedModel, step: Callable[[list[dict]], None], examples: list[dict], checkpointed: int
) -> None:
    """Run the probes' steps unmeasured, for a reused plan whose compiled graphs were loaded.

    The graphs a measured run stored were compiled in the probes' order: batch 1, then 2, at which the batch
    dimension became dynamic, and the checkpointed variant. A first step at the plan's batch would instead
    compile a graph specialised to it, which the stored ones are not (seen on the H200: 30 s of compiling
    despite 60 MB of loaded artifacts, docs/benchmarks.md). Replayed, the three steps find their graphs.
    """
    probe_steps(model, step, examples, lambda run: run())
    set_checkpointed_layers(model, checkpointed)


def plan_memory(
    model: PreTrainedModel,
    step: Callable[[list[dict]], None],
    examples: list[dict],
    budget: int,
    batch_size: int | None,
    checkpointing: str,
) -> Plan:
    """Measure training steps of 1 and 2 samples (2 also with every layer checkpointed), fit memory as
    fixed + batch x (per sample - checkpointed layers x saving), and choose the plan for the budget.

    The probes run the real step (same collator, loss, compiled layers), so the fit holds for this model,
    these inputs and this PyTorch; the optimizer's two fp32 moments per trainable weight are added.
    """
    layers = len(decoder_layers(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_states = 8 * trainable
    one, two, two_checkpointed = probe_steps(model, step, examples, measure_peak)
    per_sample = max(two - one, 1)
    fixed = max(one - per_sample, 0) + optimizer_states
    per_layer_saving = max((two - two_checkpointed) // (2 * layers), 0)
    available = int(budget * (1 - MEMORY_MARGIN)) - torch.cuda.memory_allocated()
    try:
        plan = choose_plan(layers, per_sample, per_layer_saving, fixed, available, batch_size, checkpointing)
    except MemoryError as error:
        # What the first training step would raise, said before it: the trainer names the pass.
        raise torch.OutOfMemoryError(str(error)) from None
    set_checkpointed_layers(model, plan.checkpointed_layers)
    log.info("memory plan for %.1f GiB: %s", budget / GIB, plan.describe())
    return plan


@dataclass
class PassMemory:
    """A no-grad GPU pass (image features, evaluation), measured: bytes that do not grow with the batch,
    bytes per item, and the budget left for it."""

    fixed: int
    per_item: int
    available: int


def measure_pass(run: Callable[[int], object], budget: int) -> PassMemory:
    """Run the pass on 1 and 2 items (`run(count)`) and fit its peak as fixed + count x per item, as
    plan_memory does for training steps; available is the budget less its margin and what is allocated."""
    one = measure_peak(lambda: run(1))
    two = measure_peak(lambda: run(2))
    available = int(budget * (1 - MEMORY_MARGIN)) - torch.cuda.memory_allocated()
    if two == RAN_OUT and one != RAN_OUT:
        return PassMemory(0, one, available)  # one item fits, two do not: batches of one
    per_item = max(two - one, 1)
    return PassMemory(max(one - per_item, 0), per_item, available)


def pass_batch(name: str, requested: int, memory: PassMemory) -> int:
    """The largest batch up to `requested` (--eval-batch-size) whose memory fits, logged; when not even
    one item fits, the torch.OutOfMemoryError the pass would raise, said before it runs."""
    measured = (
        f"measured {memory.per_item / GIB:.2f} GiB per image + {memory.fixed / GIB:.2f} GiB, "
        f"{memory.available / GIB:.1f} GiB available"
    )
    fits = (memory.available - memory.fixed) // memory.per_item
    if fits < 1:
        raise torch.OutOfMemoryError(f"{name}: not even one image fits ({measured})")
    batch = min(requested, fits)
    if batch < requested:
        log.info(
            "%s: batches of %d, planned from memory (%s; --eval-batch-size %d does not fit)",
            name,
            batch,
            measured,
            requested,
        )
    else:
        log.info("%s: batches of %d fit (%s)", name, batch, measured)
    return batch
