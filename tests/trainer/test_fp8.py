"""fp8 weight storage: the e4m3 rounding, outputs and input gradients equal to a reference computation of the
same quantized matmuls (on CPU; on CUDA when a GPU is there), nothing but the e4m3 weight kept for the
backward pass (also compiled), the automatic choice, and training as well as fp32."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.speed import choose_precision, load_model
from trainer.speed.fp8_weights import E4M3, E4M3_MAX, Fp8Linear, dequantize, quantize_rows
from trainer.speed.weights import precision_for

GIB = 2**30
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def test_weights_round_to_the_nearest_e4m3_value_of_their_row() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    with torch.no_grad():
        linear.weight[:, 7] *= 50  # an outlier input channel: every row's largest weight
    layer = Fp8Linear(linear)
    assert layer.weight.dtype == E4M3 and layer.scale.shape == (96, 1) and layer.scale.dtype == torch.float32
    w = linear.weight.detach()
    # Each row's largest weight maps to 448; the others keep 3 mantissa bits down to 2^-6 x scale (half
    # a step: 1/16 relative), and below that a step of 2^-9 x scale.
    assert torch.allclose(layer.weight.float().abs().amax(dim=1), torch.full((96,), E4M3_MAX))
    error = (dequantize(layer) - w).abs()
    bound = torch.maximum(w.abs() / 16, layer.scale * 2**-10)
    assert (error <= bound * (1 + 1e-6)).all()
    # Far finer than int8 for the small weights of a row with an outlier: int8's step is scale x 448/127.
    small = w.abs() < w.abs().amax(dim=1, keepdim=True) / 100
    int8_half_step = (layer.scale * E4M3_MAX / 127 / 2).expand_as(w)
    assert (error[small] < int8_half_step[small] / 4).all()


def reference(x: torch.Tensor, layer: Fp8Linear, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantized operands, multiplied in float64: what the FP8 matmuls must compute."""
    x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
    out = (x8.double() * x_scale.double()) @ (layer.weight.double()).t() * layer.scale.double().t()
    g8, g_scale = quantize_rows(grad.reshape(-1, grad.shape[-1]).float() * layer.scale.t())
    grad_input = (g8.double() * g_scale.double()) @ layer.weight.double()
    return out.reshape(*x.shape[:-1], -1), grad_input.reshape(x.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_layer_computes_the_quantized_matmuls_and_stays_near_the_float_layer(device: str) -> None:
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    linear = nn.Linear(256, 96, bias=True, device=device, dtype=dtype).requires_grad_(False)
    layer = Fp8Linear(linear)
    x = torch.randn(4, 10, 256, device=device, dtype=dtype)
    x[:, :, 3] *= 100  # an outlier channel in every token
    x = x.requires_grad_(True)
    out = layer(x)
    assert out.dtype == dtype
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, x, grad)
    want_out, want_grad = reference(x.detach(), layer, grad)
    # fp32 accumulation of exact products: agreement to float32 rounding, or to the rounding of the GPU's
    # bf16 output (2^-9 relative at most).
    tolerance = 1e-6 if device == "cpu" else 3e-3
    want_out = want_out + linear.bias.double()
    assert (out.double() - want_out).norm() < tolerance * want_out.norm()
    assert (got.double() - want_grad).norm() < tolerance * want_grad.norm()
    # And within e4m3's rounding of the float layer: a few per cent.
    expected = linear(x.detach()).float()
    assert (out.float() - expected).norm() < 0.06 * expected.norm()
    want = (grad.float() @ linear.weight.float()).reshape(got.shape)
    assert (got.float() - want).norm() < 0.06 * want.norm()


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"]
)
def test_backward_keeps_only_the_e4m3_weight(compiled: bool, forward_saving) -> None:
    """No copy of x, of its e4m3 form, or of the weight transposed waits for the backward pass."""
    torch.manual_seed(0)
    block = nn.Sequential(Fp8Linear(nn.Linear(128, 512)), nn.GELU(), Fp8Linear(nn.Linear(512, 128)))
    weights = {block[0].weight.data_ptr(), block[2].weight.data_ptr()}
    run = torch.compile(block, dynamic=False) if compiled else block
    x = torch.randn(2, 8, 128, requires_grad=True)
    out, saved = forward_saving(lambda: run(x))
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    fp8 = [t for t in saved if t.dtype == E4M3]
    assert {t.data_ptr() for t in fp8} == weights and all(t.shape in {(512, 128), (128, 512)} for t in fp8)
    # The one activation kept is GELU's input, for GELU's own backward; nothing of the first layer's input.
    assert not any(t.shape == x.shape for t in saved)


def test_quantize_replaces_the_language_model_linears(tiny_model: Path) -> None:
    model = load_model(str(tiny_model), "fp8", "cpu", None, 4, 8, 0.0)
    base = model.get_base_model()
    fp8 = {name for name, module in base.named_modules() if isinstance(module, Fp8Linear)}
    assert fp8 and all("language_model" in name for name in fp8)
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    assert len(adapters) == 2 * len(fp8) and all(
        p.requires_grad and p.dtype == torch.float32 for p in adapters
    )


def test_auto_picks_fp8_where_it_was_measured_faster() -> None:
    rtx_pro_6000, l4 = 95.6e9, 23.8e9
    # 27B and 4B weights (test_int8.py): fp8 in 85 GiB, and 4B within 22 GiB.
    assert precision_for(51.1 * GIB, 27.4 * GIB, 85 * GIB, rtx_pro_6000, fp8=True) == "fp8"
    assert precision_for(8.0 * GIB, 4.8 * GIB, 85 * GIB, rtx_pro_6000, fp8=True) == "fp8"
    assert precision_for(8.0 * GIB, 4.8 * GIB, 22 * GIB, l4, fp8=True) == "fp8"
    # Where its weights would crowd the budget, or the bf16 model cannot load to convert, as before: 4-bit.
    assert precision_for(22.0 * GIB, 11.5 * GIB, 22 * GIB, l4, fp8=True) == "4bit"
    # Elsewhere (no FP8 tensor cores, or not measured yet), the previous choice.
    assert precision_for(51.1 * GIB, 27.4 * GIB, 85 * GIB, rtx_pro_6000) == "int8"
    assert precision_for(8.0 * GIB, 4.8 * GIB, 85 * GIB, rtx_pro_6000) == "bf16"


def test_fp8_is_honoured_on_cpu(tiny_model: Path) -> None:
    assert choose_precision("fp8", "cpu", str(tiny_model), None) == "fp8"


@pytest.mark.slow
def test_training_with_fp8_weights_learns_like_fp32(
    trainer_cli, trained_run, tiny_model: Path, pets: Path, train_flags: list[str], tmp_path: Path
) -> None:
    flags = [*train_flags, "--eval-method", "score", "--checkpoint-strategy", "no"]
    result = trainer_cli(
        ["--model-id", str(tiny_model), "--dataset", str(pets), "--output-dir", str(tmp_path),
         "--quantization", "fp8", *flags]
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stored in fp8" in result.stdout
    fp8 = json.loads((tmp_path / "results.json").read_text())["by_method"]["score"]
    fp32 = json.loads((trained_run.run_dir / "results.json").read_text())["by_method"]["score"]
    print(f"score accuracy: fp32 {fp32['final']['accuracy']}, fp8 {fp8['final']['accuracy']}")
    assert fp8["baseline"]["accuracy"] < 0.1
    # Chance is 1/37; one run moves by up to 0.2 with the seed (test_int8.py lists the spread).
    assert fp8["final"]["accuracy"] > 0.3
    assert abs(fp8["final"]["accuracy"] - fp32["final"]["accuracy"]) <= 0.25
