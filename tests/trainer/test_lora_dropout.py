"""LoRA dropout fused into lora_A: the same function and gradients as dropout with the same mask, a seed kept
for the backward pass instead of masks and dropped copies (also compiled), one mask per input shared by the
adapters reading it, and masks that repeat when gradient checkpointing recomputes a layer."""

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
from trainer.speed.lora_dropout import DropoutLinear, DropoutSeeds, dropout_linear, input_name, keep_mask
from trainer.train import AnswerOnlyCollator


def test_output_and_gradients_are_those_of_dropout_with_the_drawn_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 40, 64, requires_grad=True)
    weight = torch.randn(8, 64, requires_grad=True)
    seed = torch.tensor(12345, dtype=torch.int32)
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
    # Another seed gives another mask; the same seed the same mask.
    assert not torch.equal(dropout_linear(x, weight, 0.3, seed + 1), out)
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
    """Two adapters reading one input, like q and k, and a third given another input's name; its model draws
    the seeds."""

    def __init__(self, seeds: DropoutSeeds) -> None:
        super().__init__()
        self.a = DropoutLinear(nn.Linear(256, 16, bias=False), 0.1, seeds, "layer.qkv")
        self.b = DropoutLinear(nn.Linear(256, 16, bias=False), 0.1, seeds, "layer.qkv")
        self.c = DropoutLinear(nn.Linear(256, 16, bias=False), 0.1, seeds, "layer.o_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.c(x)


class Model(nn.Module):
    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        seeds = DropoutSeeds()
        self.block = SharedInput(seeds)
        self.checkpointed = checkpointed
        seeds.attach(self, torch.device("cpu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)


def test_adapters_reading_one_input_share_its_mask_and_every_forward_pass_draws_new_masks() -> None:
    torch.manual_seed(0)
    model = Model()
    block = model.block
    block.b.weight = block.c.weight = block.a.weight
    x = torch.randn(2, 64, 256)

    def outputs() -> list[torch.Tensor]:
        model(x)  # draws the seed
        return [block.a(x), block.b(x), block.c(x)]

    torch.manual_seed(1)
    a, b, c = outputs()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(outputs()[0], a)
    torch.manual_seed(1)
    assert torch.equal(outputs()[0], a)  # seeded runs repeat
    with pytest.raises(RuntimeError, match="no seed"):
        SharedInput(DropoutSeeds())(x)


def test_q_k_v_and_gate_up_read_one_input_in_gemma_3() -> None:
    """The grouping is by name; this checks the names against what Gemma 3's layers do."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer

    config = Gemma3TextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_hidden_layers=1,
    )
    layer = Gemma3DecoderLayer(config, 0)
    inputs: dict[str, torch.Tensor] = {}
    for name, module in layer.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
    hidden = torch.randn(1, 5, 32)
    position = torch.arange(5)[None]
    rotary = torch.ones(1, 5, 16), torch.zeros(1, 5, 16)
    layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=position)
    groups: dict[str, set[int]] = {}
    for name, tensor in inputs.items():
        groups.setdefault(input_name(name), set()).add(id(tensor))
    assert all(len(tensors) == 1 for tensors in groups.values())
    assert {name: len(group) for name, group in groups.items()} == {
        "self_attn.qkv": 1,
        "self_attn.o_proj": 1,
        "mlp.gate_up": 1,
        "mlp.down_proj": 1,
    }
    assert sum(1 for name in inputs if input_name(name) == "self_attn.qkv") == 3


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_keeps_the_input_once_and_no_mask(compiled: bool, forward_saving) -> None:
    torch.manual_seed(0)
    model = Model()
    # fullgraph: an op the compiler cannot trace would otherwise quietly run the block eagerly.
    if compiled:
        model.block.compile(dynamic=False, fullgraph=True)
    x = torch.randn(2, 64, 256, requires_grad=True)
    out, saved = forward_saving(lambda: model(x))
    out.sum().backward()
    assert x.grad is not None and model.block.a.weight.grad.abs().sum() > 0
    input_sized = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    # PEFT's dropout would keep 3 masks and 3 dropped copies here.
    assert len(input_sized) == 1
    assert not any(t.dtype == torch.bool for t in saved)


def test_a_compiled_block_recomputed_by_checkpointing_applies_the_same_masks() -> None:
    """On the GPU each decoder layer is compiled and reads the seed the model's forward pass drew; a
    checkpointed layer recomputed in the backward pass must apply the same masks (the whole model compiled
    on CPU takes minutes, so one compiled block stands in for a layer)."""
    torch.manual_seed(0)
    model = Model()
    model.block.compile(dynamic=False, fullgraph=True)
    x = torch.randn(2, 64, 256, requires_grad=True)

    def gradients(checkpointed: bool, seed: int) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.checkpointed = checkpointed
        torch.manual_seed(seed)
        (model(x) ** 2).sum().backward()
        return [model.block.a.weight.grad.clone(), model.block.c.weight.grad.clone()]

    plain = gradients(False, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(gradients(True, seed=5), plain, strict=True))
    assert not torch.equal(gradients(False, seed=6)[0], plain[0])


def test_eval_mode_is_the_plain_projection() -> None:
    layer = DropoutLinear(nn.Linear(32, 4, bias=False), 0.5, DropoutSeeds(), "x").eval()
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
