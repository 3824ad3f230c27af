"""Which GPU pass ran out of memory, and the flags that make that pass need less.

Each pass that allocates on the GPU runs inside `gpu_pass(NAME)`: an out-of-memory error leaving it
carries the pass's name, and the trainer's message says which pass ran out and what shrinks that pass.
"""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import torch

LOADING = "loading the model"
IMAGE_FEATURES = "the image-feature pass"
BASELINE = "the baseline evaluation"
MEMORY_PLAN = "the training memory plan"
TRAINING = "training"
FINAL = "the final evaluation"
MERGING = "merging the adapter into the base model"


@contextmanager
def gpu_pass(name: str) -> Iterator[None]:
    """Name the pass in an out-of-memory error raised inside it (the innermost pass names it)."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if not hasattr(error, "gpu_pass"):
            error.gpu_pass = name
        raise


def _remedies(args: argparse.Namespace, name: str | None) -> list[str]:
    batch = f"a smaller --batch-size (now {args.batch_size or 'auto'})"
    checkpointing = f"--gradient-checkpointing on (now {args.gradient_checkpointing})"
    eval_batch = f"a smaller --eval-batch-size (now {args.eval_batch_size})"
    smaller = "4bit" if args.quantization in ("int8", "fp8") else "int8 or 4bit"
    weights = [] if args.quantization == "4bit" else [f"--quantization {smaller} (now {args.quantization})"]
    by_pass = {
        LOADING: weights,
        # These passes plan their batches from measured memory, up to --eval-batch-size: running out means
        # even that plan did not hold, so a lower ceiling or smaller weights.
        IMAGE_FEATURES: [eval_batch, *weights],
        BASELINE: [eval_batch, *weights],
        FINAL: [eval_batch, *weights],
        MEMORY_PLAN: [batch, checkpointing, *weights],
        TRAINING: [batch, checkpointing, *weights],
        MERGING: ["no --merge (the merge loads the base model in bf16 next to the trained one)"],
    }
    return by_pass.get(name or "", [batch, checkpointing, eval_batch, *weights]) or [
        "a GPU with more memory (the run already uses the smallest weights)"
    ]


def describe(args: argparse.Namespace, error: torch.OutOfMemoryError) -> tuple[str, str]:
    """(Error line, Hint line): the pass that ran out and this run's values of the flags that shrink it."""
    # PyTorch's first two sentences ("CUDA out of memory. Tried to allocate 2.00 GiB"), not its statistics.
    cause = ". ".join(str(error).split(". ")[:2])
    name = getattr(error, "gpu_pass", None)
    where = f" in {name}" if name else ""
    remedies = _remedies(args, name)
    listed = remedies[0] if len(remedies) == 1 else ", ".join(remedies[:-1]) + ", or " + remedies[-1]
    return (
        f"the GPU ran out of memory{where} ({cause}) within --max-memory-gib {args.max_memory_gib:g}.",
        f"Use {listed}.",
    )
