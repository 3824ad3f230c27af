"""FP8 frozen linear layers at Gemma 3 27B's shapes: error against bf16 and time, layer by layer.

    python bench/fp8_layers.py --out bench/results      # GPU: errors and timings, OUT/fp8_layers.jsonl
    python bench/fp8_layers.py --smoke                  # CPU: small shapes, errors only

For each of 27B's linear shapes (M = 4,230 tokens: batch 9 x 470), the output and the input gradient of:
bf16 (the weights and matmul in bf16), int8 (trainer.speed.int8_weights: int8 storage, bf16 matmul), fp8
(trainer.speed.fp8_weights: e4m3 weights and activations, FP8 matmuls) and fp8-weights (e4m3 weights expanded
to bf16, bf16 activations and matmul), each against a float32 reference with the bf16 weights. Errors are
||y - ref|| / ||ref|| over the tensor and the worst such ratio over rows (tokens), on two kinds of data:

- gaussian: weights N(0, 0.02), activations and gradients N(0, 1);
- outliers: what trained transformers show. Weights with log-normal input-channel scales (sigma 0.5) and
  heavy tails (Student t, 3 degrees of freedom); activations with log-normal channel scales (sigma 1), 8
  channels 30x larger in every token, and 1 % of the tokens holding one channel 1,000x larger (the
  "massive activations" of LLMs' residual streams); gradients with log-normal token scales (sigma 2),
  since only a few tokens carry loss.

Timings (GPU, triton's do_bench, median ms): the forward matmul in bf16, in fp8 as the trainer runs it
(the per-row quantization of x as its own compiled kernel, then the FP8 matmul) and the FP8 matmul alone,
and three input gradients, compiled as in the trainer's compiled layers: fp8 with the weight transposed
for the call (the trainer's), fp8 from a transposed copy kept in memory (twice the weight memory), and
bf16 from the e4m3 weight expanded; and the transposition alone.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.speed.fp8_weights import Fp8Linear, dequantize, fp8_grad_input, fp8_linear, quantize_rows  # noqa: E402
from trainer.speed.int8_weights import Int8Linear  # noqa: E402

# Gemma 3 27B's language model: hidden 5376, 32 query heads and 16 key/value heads of 128, MLP 21504.
SHAPES = {
    "q_proj": (5376, 4096),
    "k_proj, v_proj": (5376, 2048),
    "o_proj": (4096, 5376),
    "gate_proj, up_proj": (5376, 21504),
    "down_proj": (21504, 5376),
}
TOKENS = 4230


def weights(kind: str, k: int, n: int, device: str, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, device=device, generator=generator) * 0.02
    if kind == "outliers":
        columns = torch.exp(0.5 * torch.randn(1, k, device=device, generator=generator))
        tails = torch.distributions.StudentT(3.0).sample((n, k)).to(device) * 0.02
        w = tails * columns
    return w.to(torch.bfloat16)


def activations(kind: str, m: int, k: int, device: str, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, device=device, generator=generator)
    if kind == "outliers":
        x = x * torch.exp(torch.randn(1, k, device=device, generator=generator))
        channels = torch.randperm(k, device=device, generator=generator)[:8]
        x[:, channels] *= 30
        tokens = torch.randperm(m, device=device, generator=generator)[: max(1, m // 100)]
        x[tokens, channels[0]] *= 1000 / 30
    return x.to(torch.bfloat16)


def gradients(kind: str, m: int, n: int, device: str, generator: torch.Generator) -> torch.Tensor:
    g = torch.randn(m, n, device=device, generator=generator)
    if kind == "outliers":
        g = g * torch.exp(2 * torch.randn(m, 1, device=device, generator=generator))
    return (g * 1e-3).to(torch.bfloat16)


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative error of the whole tensor, the worst row's relative error)."""
    diff = (got.float() - ref).norm(dim=-1)
    rows = diff / ref.norm(dim=-1).clamp(min=1e-30)
    return (diff.norm() / ref.norm()).item(), rows.max().item()


def layer_errors(kind: str, k: int, n: int, m: int, device: str, seed: int) -> dict[str, dict]:
    generator = torch.Generator(device).manual_seed(seed)
    w = weights(kind, k, n, device, generator)
    x = activations(kind, m, k, device, generator)
    g = gradients(kind, m, n, device, generator)
    linear = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    linear.weight.copy_(w)
    ref_out = x.float() @ w.float().t()
    ref_grad = g.float() @ w.float()
    fp8 = Fp8Linear(linear)
    w_fp8 = dequantize(fp8).to(torch.bfloat16)
    int8 = Int8Linear(linear)
    found = {}
    for name, layer in (
        ("bf16", linear),
        ("int8", int8),
        ("fp8", fp8),
        ("fp8-weights", lambda t: nn.functional.linear(t, w_fp8)),
    ):
        xg = x.clone().requires_grad_(True)
        out = layer(xg)
        (grad,) = torch.autograd.grad(out, xg, g)
        out_error, out_worst = errors(out, ref_out)
        grad_error, grad_worst = errors(grad, ref_grad)
        found[name] = {
            "output": round(out_error, 5),
            "output_worst_row": round(out_worst, 5),
            "grad_input": round(grad_error, 5),
            "grad_input_worst_row": round(grad_worst, 5),
        }
    return found


def timings(k: int, n: int, m: int) -> dict[str, float]:
    from triton.testing import do_bench

    def bench(fn) -> float:
        return round(do_bench(fn, warmup=25, rep=100, return_mode="median"), 4)

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    w8, w_scale = quantize_rows(w)
    x8, x_scale = quantize_rows(x)
    w8_by_column = w8.t().contiguous().t()  # the transposed copy a stored-layout variant would keep
    ones = torch.ones((1, k), dtype=torch.float32, device="cuda")
    backward = torch.compile(fp8_grad_input, dynamic=False)

    def stored(grad):
        g8, g_scale = quantize_rows(grad.float() * w_scale.t())
        return torch._scaled_mm(g8, w8_by_column, scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)

    def expanded(grad):
        return grad @ (w8.float() * w_scale).to(torch.bfloat16)

    stored, expanded = torch.compile(stored, dynamic=False), torch.compile(expanded, dynamic=False)
    transpose = torch.compile(lambda t: t.t().contiguous(), dynamic=False)
    return {
        "forward_bf16_ms": bench(lambda: x @ w.t()),
        "forward_fp8_ms": bench(lambda: fp8_linear(x, w8, w_scale)),
        "forward_fp8_matmul_only_ms": bench(
            lambda: torch._scaled_mm(
                x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=torch.bfloat16
            )
        ),
        "grad_bf16_ms": bench(lambda: g @ w),
        "grad_fp8_transposed_per_call_ms": bench(lambda: backward(g, w8, w_scale)),
        "grad_fp8_stored_transpose_ms": bench(lambda: stored(g)),
        "grad_bf16_from_fp8_weights_ms": bench(lambda: expanded(g)),
        "transpose_fp8_weight_ms": bench(lambda: transpose(w8)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--smoke", action="store_true", help="CPU, shapes / 16, 64 tokens, errors only")
    bench = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not bench.smoke else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references stay float32
    torch.manual_seed(0)  # the Student t draws
    bench.out.mkdir(parents=True, exist_ok=True)
    divide, m = (16, 64) if bench.smoke else (1, TOKENS)
    table = []
    for name, (k, n) in SHAPES.items():
        k, n = k // divide, n // divide
        row = {
            "shape": name,
            "k": k,
            "n": n,
            "m": m,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        }
        for kind in ("gaussian", "outliers"):
            row[kind] = layer_errors(kind, k, n, m, device, seed=0)
        if device == "cuda":
            row.update(timings(k, n, m))
        print("FP8LAYER " + json.dumps(row), flush=True)
        with (bench.out / "fp8_layers.jsonl").open("a") as file:
            file.write(json.dumps(row) + "\n")
        table.append(row)
    print(
        f"\n{'shape':20} {'data':9} {'variant':12} {'out err':>8} {'worst row':>9} {'dX err':>8} {'worst':>9}"
    )
    for row in table:
        for kind in ("gaussian", "outliers"):
            for variant, e in row[kind].items():
                print(
                    f"{row['shape']:20} {kind:9} {variant:12} {e['output']:8.4f} "
                    f"{e['output_worst_row']:9.4f} {e['grad_input']:8.4f} {e['grad_input_worst_row']:9.4f}"
                )
    if device == "cuda":
        keys = [key for key in table[0] if key.endswith("_ms")]
        print("\n" + " | ".join(["shape", *keys]))
        for row in table:
            print(" | ".join([row["shape"], *(f"{row[key]:.3f}" for key in keys)]))


if __name__ == "__main__":
    main()
