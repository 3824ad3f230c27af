"""LoRA's input dropout fused with the adapter's first projection, keeping a seed instead of masks.

PEFT computes lora_B(lora_A(dropout(x))), so autograd keeps, for every adapted linear, the dropout mask and
the dropped copy of x: 3 bytes per input value, a quarter of the activation memory of 27B training (3.2 GiB
per sample, docs/benchmarks.md). Here lora_A applies the dropout itself and keeps only x, which the adapters
reading the same input (q, k and v; gate and up) share, and the seed its mask was drawn from: the backward
pass draws the same mask again. Same distribution as PEFT's dropout, different random draws.
"""

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional


def keep_mask(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """1 where x is kept, 0 where dropped; the same mask for the same seed, shape and device."""
    generator = torch.Generator(x.device).manual_seed(int(seed))
    return torch.empty_like(x).bernoulli_(1 - p, generator=generator)


# A custom op, opaque to torch.compile: traced as plain ops, the compiler would keep the mask and the
# dropped copy again. The seed comes from the default CPU generator: seeded runs repeat, gradient
# checkpointing restores it before recomputing a layer, and drawing it never waits for the GPU.
@torch.library.custom_op("gemma_launch::dropout_linear", mutates_args=())
def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x, p) @ weight.T, the seed of its mask)."""
    seed = torch.randint(2**62, (), dtype=torch.int64)
    dropped = x * keep_mask(x, p, seed)
    return functional.linear(dropped, weight) / (1 - p), seed


@dropout_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return out, torch.empty((), dtype=torch.int64)


def _save_input_and_seed(ctx, inputs: tuple, output: tuple) -> None:
    x, weight, p = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.p = p


# The backward is an op of its own as well: the compiler traces register_autograd's function, and the mask
# depends on the seed's value, which a traced graph cannot read.
@torch.library.custom_op("gemma_launch::dropout_linear_backward", mutates_args=())
def dropout_linear_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input gradient, weight gradient) of dropout_linear, with the mask drawn again from its seed."""
    keep = keep_mask(x, p, seed)
    grad = grad / (1 - p)
    grad_x = (grad @ weight) * keep
    grad_weight = grad.flatten(0, -2).T @ (x * keep).flatten(0, -2)
    return grad_x, grad_weight


@dropout_linear_backward.register_fake
def _(grad, x, weight, seed, p) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _backward(ctx, grad: torch.Tensor, _seed_grad: torch.Tensor | None) -> tuple:
    x, weight, seed = ctx.saved_tensors
    grad_x, grad_weight = dropout_linear_backward(grad, x, weight, seed, ctx.p)
    return grad_x, grad_weight, None


dropout_linear.register_autograd(_backward, setup_context=_save_input_and_seed)


class DropoutLinear(nn.Linear):
    """An adapter's lora_A that applies the adapter's dropout itself while training (an nn.Linear with the
    same weight, so checkpoints, merging and PEFT's code see the usual layer)."""

    def __init__(self, linear: nn.Linear, p: float) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return functional.linear(x, self.weight)
        # Under mixed precision the adapter's float32 weight and input meet in the autocast dtype, as they
        # would in nn.Linear; the op itself computes in one dtype.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        out, _seed = dropout_linear(x.to(dtype), self.weight.to(dtype), self.p)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def fuse_lora_dropout(model: nn.Module) -> None:
    """Move each LoRA layer's dropout into its lora_A (DropoutLinear), in place."""
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, dropout in list(layer.lora_dropout.items()):
            if isinstance(dropout, nn.Dropout) and dropout.p > 0 and name in layer.lora_A:
                layer.lora_A[name] = DropoutLinear(layer.lora_A[name], dropout.p)
                layer.lora_dropout[name] = nn.Identity()
