"""LoRA dropout fused into lora_A: the same function and gradients as dropout with the same mask, a seed kept
for the backward pass instead of masks and dropped copies (also compiled), and masks that repeat when
gradient checkpointing recomputes a layer."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

from trainer.data import chat_format, load_pets
from trainer.modeling import load_processor
from trainer.speed import load_model
from trainer.speed.layers import decoder_layers, set_checkpointed_layers
from trainer.speed.lora_dropout import DropoutLinear, draw_seed, dropout_linear, keep_mask
from trainer.train import AnswerOnlyCollator


def test_output_and_gradients_are_those_of_dropout_with_the_drawn_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 64, requires_grad=True)
    weight = torch.randn(8, 64, requires_grad=True)
    seed = draw_seed(x.device)
    out = dropout_linear(x, weight, 0.3, seed)
    keep = keep_mask(x, 0.3, seed)
    assert keep.dtype == torch.bool and 0.65 < keep.float().mean().item() < 0.75  # 7,680 draws of p = 0.7
    expected = functional.linear(x * keep / 0.7, weight)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight), grad)
    want = torch.autograd.grad(expected, (x, weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # Each call draws a new seed; the same seed gives the same mask.
    assert not torch.equal(dropout_linear(x, weight, 0.3, draw_seed(x.device)), out)
    assert torch.equal(keep_mask(x, 0.3, seed), keep)


@pytest.mark.slow
def test_masks_look_like_independent_draws() -> None:
    """A hash is not a random generator: its masks must still keep 1 - p of the values, with no pattern
    along rows or columns, and masks of different seeds must be unrelated."""
    x = torch.empty(64, 512, 384)  # 12.6 M values, beyond 2**24 positions
    p = 0.05
    masks = [keep_mask(x, p, torch.tensor(seed)).float() for seed in (0, 1, 2**30)]
    for keep in masks:
        assert abs(keep.mean().item() - (1 - p)) < 0.001
        dropped = 1 - keep
        # Neighbours along each axis are dropped together as often as independent draws would be (p**2).
        for dim in range(3):
            together = dropped.narrow(dim, 0, x.shape[dim] - 1) * dropped.narrow(dim, 1, x.shape[dim] - 1)
            assert abs(together.mean().item() - p**2) < 0.0005
        # Every position along the last axis keeps about the same share (no striped columns).
        assert keep.mean(dim=(0, 1)).sub(1 - p).abs().max().item() < 0.01
    for first, second in [(0, 1), (0, 2), (1, 2)]:
        both_dropped = ((1 - masks[first]) * (1 - masks[second])).mean().item()
        assert abs(both_dropped - p**2) < 0.0005


class SharedInput(nn.Module):
    """Two adapters reading one input, like q and k."""

    def __init__(self) -> None:
        super().__init__()
        self.a = DropoutLinear(nn.Linear(256, 16, bias=False), 0.1)
        self.b = DropoutLinear(nn.Linear(256, 16, bias=False), 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_the_input_once_and_no_mask(compiled: bool, forward_saving) -> None:
    torch.manual_seed(0)
    block = SharedInput()
    # fullgraph: an op the compiler cannot trace would otherwise quietly run the block eagerly.
    block = torch.compile(block, dynamic=False, fullgraph=True) if compiled else block
    x = torch.randn(2, 64, 256, requires_grad=True)
    out, saved = forward_saving(lambda: block(x))
    out.sum().backward()
    assert x.grad is not None and block.a.weight.grad.abs().sum() > 0
    input_sized = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    # PEFT's dropout would keep 2 masks and 2 dropped copies here.
    assert len(input_sized) == 1
    assert not any(t.dtype == torch.bool for t in saved)


def test_a_compiled_block_draws_the_same_masks_when_checkpointing_recomputes_it() -> None:
    """On the GPU each decoder layer is compiled and the seeds are drawn inside its graph; recomputing a
    checkpointed layer must draw them again from the restored generator (the whole model compiled on CPU
    takes minutes, so one compiled block stands in for a layer)."""
    torch.manual_seed(0)
    block = SharedInput()
    block.compile(dynamic=False, fullgraph=True)
    x = torch.randn(2, 64, 256, requires_grad=True)

    def gradients(checkpointed: bool, seed: int) -> list[torch.Tensor]:
        block.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        (out**2).sum().backward()
        return [block.a.weight.grad.clone(), block.b.weight.grad.clone()]

    plain = gradients(False, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(gradients(True, seed=5), plain, strict=True))
    assert not torch.equal(gradients(False, seed=6)[0], plain[0])


def test_eval_mode_is_the_plain_projection() -> None:
    layer = DropoutLinear(nn.Linear(32, 4, bias=False), 0.5).eval()
    x = torch.randn(5, 32)
    assert torch.equal(layer(x), functional.linear(x, layer.weight))


@pytest.fixture(scope="module")
def batch(tiny_model: Path, pets: Path) -> dict:
    processor = load_processor(str(tiny_model), None)
    data = load_pets(str(pets), 37, 37, seed=0)
    chat = chat_format(processor, data.class_names)
    return AnswerOnlyCollator(processor, chat)([data.train[index] for index in range(3)])


def lora_gradients(model, batch: dict, seed: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_adapters_apply_their_dropout_in_lora_a_and_checkpointing_repeats_the_masks(
    tiny_model: Path, batch: dict
) -> None:
    model = load_model(str(tiny_model), "fp32", "cpu", None, 4, 8, 0.2)
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_dropout") and "default" in m.lora_A]
    assert lora_layers
    for layer in lora_layers:
        assert isinstance(layer.lora_A["default"], DropoutLinear) and layer.lora_A["default"].p == 0.2
        assert isinstance(layer.lora_dropout["default"], nn.Identity)
    model.train()
    plain = lora_gradients(model, batch, seed=1)
    again, other = lora_gradients(model, batch, seed=1), lora_gradients(model, batch, seed=2)
    assert all(torch.equal(again[name], grad) for name, grad in plain.items())
    assert any(not torch.equal(other[name], grad) for name, grad in plain.items())
    # Recomputing every layer in the backward pass must draw the same masks as its forward pass did.
    set_checkpointed_layers(model, len(decoder_layers(model)))
    checkpointed = lora_gradients(model, batch, seed=1)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)
