"""Frozen linear weights stored as float8 e4m3 (one scale per output channel) and used by FP8 tensor cores.

The memory of int8 storage (one byte per weight), but where int8 expands each weight to bf16 for a bf16
matmul, here the matmuls themselves run in FP8: the layer's input is quantized to e4m3 per row (one
scale per token) and `torch._scaled_mm` multiplies it with the e4m3 weight, applying both scales to the
fp32 accumulator: faster than bf16 matmuls at 27B's shapes on Hopper (docs/benchmarks.md, "FP8 base
weights"). LoRA, norms, attention and the loss stay in bf16.

The input gradient, dX = dY @ W, runs in FP8 too. Its reduction runs over the output channels, the axis
the weight scales belong to, so they cannot be applied to the product: they are folded into the gradient
first (dY * s per column, then per-row scales for the e4m3 gradient). The tensor cores want both operands
contiguous along the reduction, so the e4m3 weight is transposed for the call (a compiled copy, a few
per cent of a step); keeping a transposed copy would double the weights' memory to bf16's.

e4m3 keeps 3 mantissa bits from 2^-9 to 448 times its scale: coarser than int8 near a row's largest
value, much finer for the small values of a row that holds an outlier.
"""

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s in e4m3, s) with s = the row's largest magnitude / 448, in float32, shape [rows, 1]."""
    scale = (t.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
    # The clamp keeps a value that rounds just above 448 from becoming NaN (e4m3fn has no infinity).
    return (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


# Eager, the quantization is several kernels over x; compiled, one, several times faster
# (docs/benchmarks.md). Dynamic shapes: the number of rows changes with the batch, and one kernel serves
# every weight shape.
_compiled_quantize_rows = torch.compile(quantize_rows, dynamic=True)


def _quantize_on_device(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not t.is_cuda:
        return quantize_rows(t)
    with torch.no_grad():
        return _compiled_quantize_rows(t)


# A custom op, opaque to torch.compile, as int8_linear is. Traced as plain ops into a compiled decoder layer,
# the quantization fused with the norm before it, but the partitioner then kept a float32 copy of every
# layer input (or the bf16 norm and GeGLU outputs it would otherwise recompute) for the backward pass:
# nearly twice int8's memory per sample, so a smaller batch with layers checkpointed (docs/benchmarks.md,
# "A custom op, as int8").
@torch.library.custom_op("gemma_launch::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x @ (w8 * w_scale).T in x's dtype, with x quantized per row: x [..., K], w8 [N, K] e4m3, w_scale
    [N, 1] float32."""
    x8, x_scale = _quantize_on_device(x.reshape(-1, x.shape[-1]))
    # _scaled_mm takes its second operand column-major: w8.t() is, as a view of the row-major weight.
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=w_scale.t(), out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], w8.shape[0])


@fp8_linear.register_fake
def _(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w8.shape[0]))


def fp8_grad_input(grad: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """grad @ (w8 * w_scale) for grad [M, N]: the weight scales folded into the gradient's columns."""
    g8, g_scale = quantize_rows(grad.float() * w_scale.t())
    # The reduction runs over N, so the second operand must be N-contiguous: a transposed copy of w8.
    w8_by_column = w8.t().contiguous().t()
    ones = torch.ones((1, w8.shape[1]), dtype=torch.float32, device=w8.device)
    return torch._scaled_mm(g8, w8_by_column, scale_a=g_scale, scale_b=ones, out_dtype=grad.dtype)


def _save_weights(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, w8, w_scale = inputs
    ctx.save_for_backward(w8, w_scale)


def _grad_input(ctx, grad: torch.Tensor) -> tuple:
    w8, w_scale = ctx.saved_tensors
    # The weights are frozen: only the input gets a gradient. Traced into the compiled layer's backward
    # graph, where the compiler fuses the fold and quantization with the kernels that produce the gradient,
    # and makes the transposed weight with its own kernel (eager, that copy runs at 300 GB/s).
    rows = grad.reshape(-1, grad.shape[-1])
    return fp8_grad_input(rows, w8, w_scale).reshape(*grad.shape[:-1], w8.shape[1]), None, None


fp8_linear.register_autograd(_grad_input, setup_context=_save_weights)


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear holding its weight as e4m3 rows and a float32 scale per row; computes in the
    original weight's dtype (bf16 on the GPU).

    A subclass of nn.Linear, so PEFT wraps it with its usual LoRA layer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach()
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        q, scale = quantize_rows(weight)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias
        self.compute_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x.to(self.compute_dtype), self.weight, self.scale)
        return out if self.bias is None else out + self.bias


def dequantize(layer: Fp8Linear) -> torch.Tensor:
    """The weight the layer multiplies by, in float32."""
    return layer.weight.float() * layer.scale


def has_fp8_tensor_cores(device: int | None = None) -> bool:
    """Ada (8.9), Hopper (9.0) and later: the L4, H100/H200 and RTX PRO 6000 have FP8 matmuls."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


# Where fp8 was measured faster than the previous defaults at 4B and 27B (docs/benchmarks.md): Hopper, on the
# H200. Ada (the L4) and Blackwell (the RTX PRO 6000) have FP8 tensor cores too but were not measured, so
# `auto` keeps their previous choice there until they are; `--quantization fp8` runs on them.
FP8_MEASURED_FASTER = {(9, 0)}


def fp8_measured_faster(device: int | None = None) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) in FP8_MEASURED_FASTER
