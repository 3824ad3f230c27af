"""Frozen linear weights stored as int8 (one scale per output row) and used in bf16: half the memory of
bf16 weights, the same matmuls.

Where bf16 weights would leave too little of the memory budget for a useful batch (27B in 85 GiB: 51 of
them), int8 storage frees half of it for activations. Unlike 4-bit NF4 the compute stays a plain bf16
matmul: each layer's weight is expanded to bf16 just before its matmul, in the forward and again in the
backward pass, and only the int8 copy stays in memory. Rounding: one part in 254 of the row's largest
weight, 16 times finer than NF4's 16 levels.
"""

import re

import torch
from torch import nn
from torch.nn import functional

INT8_MAX = 127


def expand(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The weight in the scale's dtype. One pass: int8 x bf16 promotes to bf16 (reads 1 byte, writes 2 per
    weight), with the same values as converting q first, which would take a second pass over the weight."""
    return q * scale


# Inside the custom op nothing is compiled, and on the GPU eager int8 x bf16 runs through a generic casting
# kernel at a third of the memory bandwidth (docs/benchmarks.md, "int8 base weights"); the compiled kernel
# streams it.
_compiled_expand = torch.compile(expand, dynamic=False)


def _expand_on_device(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if not q.is_cuda:
        return expand(q, scale)
    # One compiled kernel per weight shape, whether called while training or evaluating.
    with torch.no_grad():
        return _compiled_expand(q, scale)


# A custom op, opaque to torch.compile: traced as plain ops, the compiler would keep each expanded bf16
# weight from the forward pass for the backward one (as much memory as bf16 weights, measured on CPU).
@torch.library.custom_op("gemma_launch::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x @ (q * scale).T in the scale's dtype; the expanded weight lives only during the matmul."""
    return functional.linear(x.to(scale.dtype), _expand_on_device(q, scale))


@int8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], q.shape[0]), dtype=scale.dtype)


def _save_weights(ctx, inputs: tuple, output: torch.Tensor) -> None:
    x, q, scale = inputs
    ctx.save_for_backward(q, scale)
    ctx.input_dtype = x.dtype


def _grad_input(ctx, grad: torch.Tensor) -> tuple:
    q, scale = ctx.saved_tensors
    # The weights are frozen: only the input gets a gradient, from a weight expanded again.
    # Traced into the compiled backward graph, where the compiler fuses the expansion itself (and cannot
    # trace a compiled function).
    grad_input = grad.to(scale.dtype) @ expand(q, scale)
    return grad_input.to(ctx.input_dtype), None, None


int8_linear.register_autograd(_grad_input, setup_context=_save_weights)


class Int8Linear(nn.Linear):
    """A frozen nn.Linear holding its weight as int8 rows and a per-row scale in the compute dtype.

    A subclass of nn.Linear, so PEFT wraps it with its usual LoRA layer.
    """

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach()
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        # Rounded to the compute dtype first, so the int8 values are chosen against the scale used.
        scale = (weight.abs().amax(dim=1, keepdim=True).float() / INT8_MAX).clamp(min=1e-12).to(weight.dtype)
        q = torch.round(weight.float() / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.weight, self.scale)
        return out if self.bias is None else out + self.bias


def quantize_linear_layers(model: nn.Module, pattern: str, layer: type[nn.Linear] = Int8Linear) -> int:
    """Replace each nn.Linear whose full name matches `pattern` by `layer` (Int8Linear, or Fp8Linear from
    trainer.speed.fp8_weights), in place, one at a time (the peak is one layer's float32 copy). Returns how
    many were replaced."""
    regex = re.compile(pattern)
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and regex.fullmatch(full):
                setattr(parent, name, layer(child))
                replaced += 1
    return replaced


def int8_weight_bytes(model: nn.Module, pattern: str) -> int:
    """Bytes the model's parameters would take with the matching linear layers' weights in int8 (plus a
    bf16 scale per row) and all else in bf16; works on a model on the meta device. e4m3 weights take the
    same, up to their float32 scales (2 more bytes per row)."""
    regex = re.compile(pattern)
    int8 = {
        id(module.weight): module.out_features
        for name, module in model.named_modules()
        if type(module) is nn.Linear and regex.fullmatch(name)
    }
    # parameters() lists a tied weight (the embeddings and the LM head) once.
    return sum(p.numel() + 2 * int8[id(p)] if id(p) in int8 else 2 * p.numel() for p in model.parameters())
