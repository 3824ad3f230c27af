"""LoRA's input dropout fused with the adapter's first projection, keeping a seed instead of masks.

PEFT computes lora_B(lora_A(dropout(x))), so autograd keeps, for every adapted linear, the dropout mask and
the dropped copy of x: 3 bytes per input value, a quarter of the activation memory of 27B training
(docs/benchmarks.md, "LoRA dropout hashed from a seed"). Here lora_A applies the dropout itself and keeps
only x, which the adapters reading the same input (q, k and v; gate and up) share, and a seed: the mask is
a hash of the seed and each value's index, so the backward pass computes it again. Same distribution as
PEFT's dropout, other draws.

The hash is plain tensor arithmetic rather than a random number generator, so torch.compile fuses the mask
into the kernels that read x, in the forward and in the backward pass, and may recompute it wherever it
likes: the same seed always gives the same mask.
"""

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

# The multiplier of a well-mixing 32-bit integer hash (two xorshift-multiply rounds).
_HASH_MULTIPLIER = 0x45D9F3B


def _shift16(value: torch.Tensor) -> torch.Tensor:
    """value >> 16 as if unsigned: int32 shifts copy the sign bit in, which would lose one bit per round."""
    return (value >> 16) & 0xFFFF


def _mix32(value: torch.Tensor) -> torch.Tensor:
    """A bijective hash of int32 tensors (their 32 bits, with wrapping multiplication)."""
    value = (_shift16(value) ^ value) * _HASH_MULTIPLIER
    value = (_shift16(value) ^ value) * _HASH_MULTIPLIER
    return _shift16(value) ^ value


def keep_mask(x: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """True where x is kept (with probability 1 - p), False where dropped: a function of the seed, the shape
    and each value's position only, so computing it again gives the same mask."""
    width = x.shape[-1]
    rows = torch.arange(x.numel() // width, device=x.device, dtype=torch.int32)
    # Each row of the last axis hashes its own run of 32-bit counters. Only the two small index ranges are
    # shared between adapters: every x-sized value depends on the seed, so nothing x-sized is shared (and
    # kept) between the checkpointed adapters of one compiled layer.
    seed = seed.to(torch.int32)
    row_starts = _mix32(_mix32(rows ^ seed) ^ seed)
    counters = row_starts[:, None] + torch.arange(width, device=x.device, dtype=torch.int32)
    # int32 arithmetic wraps as the unsigned 32-bit hash needs; its values are uniform over the int32 range.
    threshold = round((1 - p) * 2**32) - 2**31
    return (_mix32(counters) < threshold).view(x.shape)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A seed for one dropout mask, from the device's default generator: seeded runs repeat, and gradient
    checkpointing restores that generator before it recomputes a layer. No host-device copy, no wait."""
    return torch.randint(2**31, (), device=device, dtype=torch.int32)


def _dropout_linear(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    return functional.linear(x * keep_mask(x, p, seed), weight) / (1 - p)


def _checkpointed_dropout_linear(
    x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float
) -> torch.Tensor:
    return checkpoint(_dropout_linear, x, weight, seed, p, use_reentrant=False, preserve_rng_state=False)


# Run eagerly on a GPU, the hash would be a dozen integer kernels over x per call; compiled, it is part of the
# kernel that reads x. (Inside a compiled layer it is traced with the layer anyway; CPU runs stay eager.)
# The checkpoint is compiled with it: a compiled function inside an eager checkpoint may keep its tensors
# in another order when a checkpointed decoder layer recomputes it, which checkpointing refuses.
_checkpointed_dropout_linear_on_gpu = torch.compile(_checkpointed_dropout_linear)


def dropout_linear(x: torch.Tensor, weight: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """dropout(x, p) @ weight.T with the mask keep_mask(x, p, seed), keeping only x, weight and seed for the
    backward pass.

    Checkpointing these few operations recomputes the mask, the dropped x and the small projection in the
    backward pass. A rule of torch.compile's partitioner would otherwise keep the mask (smaller than the
    hash values it comes from) and the dropped x (a matmul of the backward pass reads it).
    """
    eager_on_gpu = x.is_cuda and not torch.compiler.is_compiling()
    function = _checkpointed_dropout_linear_on_gpu if eager_on_gpu else _checkpointed_dropout_linear
    return function(x, weight, seed, p)


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
        # would in nn.Linear; the checkpointed function computes in one dtype.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        return dropout_linear(x.to(dtype), self.weight.to(dtype), self.p, draw_seed(x.device))

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
