"""What the LoRA dropout mask costs: one adapter's lora_A with dropout, forward and backward, at 27B's shapes;
and the adapters reading one input with a mask each or one shared mask.

    python bench/dropout_mask.py --out bench/results     # GPU: OUT/dropout_mask.jsonl
    python bench/dropout_mask.py --smoke                 # CPU: small shapes, the code paths only

For M = 4,230 tokens (batch 9 x 470) and the widths an adapter reads in 27B (5,376 for q, k, v, gate, up;
4,096 for o; 21,504 for down), the compiled function the trainer's compiled layers contain,
linear(x * mask, A) / (1 - p) with A of rank 16, timed forward + backward (gradients of x and A) with:

- none: p = 0, no mask (the floor);
- trainer: p = 0.05 with trainer.speed.lora_dropout.keep_mask.

Then the adapters that read one input (q, k and v: three; gate and up: two; 5,376 wide) through the
trainer's trainer.speed.lora_dropout.dropout_linear, compiled together as in a layer, forward + backward:

- none: p = 0;
- a mask each: a seed per adapter (the trainer before 2026-12-04's night session);
- one mask: one seed, the trainer's now: the compiler merges the masks and dropped copies.

Median milliseconds from triton's do_bench on a GPU (time.perf_counter on CPU).
"""

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.speed.lora_dropout import dropout_linear, keep_mask  # noqa: E402

RANK = 16
P = 0.05
WIDTHS = {"q, k, v, gate, up": 5376, "o": 4096, "down": 21504}
SHARED_INPUTS = {"q, k, v": 3, "gate, up": 2}
TOKENS = 4230


MASKS: dict[str, Callable | None] = {"none": None, "trainer": keep_mask}


def adapter_input(mask: Callable | None) -> Callable:
    def run(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
        if mask is None:
            return functional.linear(x, weight)
        return functional.linear(x * mask(x, P, seed), weight) / (1 - P)

    return torch.compile(run)


def adapters_of_one_input(variant: str) -> Callable:
    def run(x: torch.Tensor, weights: list[torch.Tensor], seed: torch.Tensor) -> torch.Tensor:
        out = 0
        for index, weight in enumerate(weights):
            if variant == "none":
                out = out + functional.linear(x, weight)
            else:
                # Another seed per adapter is another computation, which the compiler cannot merge.
                adapter_seed = seed + index if variant == "a mask each" else seed
                out = out + dropout_linear(x, weight, P, adapter_seed)
        return out

    return torch.compile(run)


def forward_backward(function: Callable, x, weight, seed, grad) -> None:
    out = function(x, weight, seed)
    torch.autograd.grad(out, (x, weight), grad)


def forward_backward_all(function: Callable, x, weights, seed, grad) -> None:
    torch.autograd.grad(function(x, weights, seed), (x, *weights), grad)


def median_ms(step: Callable, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=50, rep=300, return_mode="median")
    times = []
    for _ in range(5):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def result(adapters: str, tokens: int, width: int, times: dict[str, float], device: str) -> dict:
    row = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "adapters": adapters,
        "tokens": tokens,
        "width": width,
        "p": P,
        "forward_backward_ms": times,
    }
    print("RESULT " + json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--smoke", action="store_true", help="CPU, small shapes")
    bench = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not bench.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens, widths = (64, {"small": 256}) if bench.smoke else (TOKENS, WIDTHS)
    rows = []
    for name, width in widths.items():
        x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(RANK, width, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, RANK, device=device, dtype=dtype)
        seed = torch.randint(2**31, (), device=device, dtype=torch.int32)
        times = {}
        for variant, mask in MASKS.items():
            function = adapter_input(mask)

            step = functools.partial(forward_backward, function, x, weight, seed, grad)
            times[variant] = round(median_ms(step, device), 4)
        rows.append(result(name, tokens, width, times, device))
    for name, count in SHARED_INPUTS.items():
        width = 256 if bench.smoke else WIDTHS["q, k, v, gate, up"]
        x = torch.randn(tokens, width, device=device, dtype=dtype, requires_grad=True)
        weights = [
            torch.randn(RANK, width, device=device, dtype=dtype, requires_grad=True) for _ in range(count)
        ]
        grad = torch.randn(tokens, RANK, device=device, dtype=dtype)
        seed = torch.randint(2**31, (), device=device, dtype=torch.int32)
        times = {}
        for variant in ("none", "a mask each", "one mask"):
            step = functools.partial(
                forward_backward_all, adapters_of_one_input(variant), x, weights, seed, grad
            )
            times[variant] = round(median_ms(step, device), 4)
        rows.append(result(f"{name} (one input)", tokens, width, times, device))
    if not bench.smoke:
        bench.out.mkdir(parents=True, exist_ok=True)
        with (bench.out / "dropout_mask.jsonl").open("a") as file:
            file.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
