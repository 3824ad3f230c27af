"""LoRA dropout fused into lora_A: the same function and gradients as dropout with the same mask, a seed kept
for the backward pass instead of masks and dropped copies (also compiled), and masks that repeat when
gradient checkpointing recomputes a layer."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional

from trainer.data import chat_format, load_pets
from trainer.lora_dropout import DropoutLinear, dropout_linear, keep_mask
from trainer.modeling import load_model, load_processor
from trainer.speed import decoder_layers, set_checkpointed_layers
from trainer.train import AnswerOnlyCollator


def test_output_and_gradients_are_those_of_dropout_with_the_drawn_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 64, requires_grad=True)
    weight = torch.randn(8, 64, requires_grad=True)
    out, seed = dropout_linear(x, weight, 0.3)
    keep = keep_mask(x, 0.3, seed)
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    assert 0.65 < keep.mean().item() < 0.75  # 7,680 draws of p(keep) = 0.7
    expected = functional.linear(x * keep / 0.7, weight)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, weight), grad)
    want = torch.autograd.grad(expected, (x, weight), grad)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    # Each call draws a new mask; the same seed gives the same one.
    assert not torch.equal(dropout_linear(x, weight, 0.3)[0], out)
    assert torch.equal(keep_mask(x, 0.3, seed), keep)


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
