"""Which base weights a run stores (bf16, fp8, int8 or 4-bit) and the int8/fp8 storage itself."""

import logging

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, PreTrainedModel

from trainer import UserError
from trainer.modeling import LANGUAGE_MODEL_LINEAR
from trainer.speed.fp8_weights import Fp8Linear, fp8_measured_faster, has_fp8_tensor_cores
from trainer.speed.int8_weights import Int8Linear, int8_weight_bytes, quantize_linear_layers

log = logging.getLogger(__name__)

# Weights may take this share of the GPU memory budget; the rest is for activations, whose room sets the
# batch. bf16 weights above it (27B: 51 of 85 GiB) would leave room for batch 2 only: int8 storage is faster
# there (docs/benchmarks.md), and 4-bit when even int8 weights do not leave it.
WEIGHT_MEMORY_SHARE = 0.5
# int8 and fp8 weights are made from bf16 ones on the GPU: the bf16 model must fit the GPU while it loads.
LOAD_MEMORY_SHARE = 0.9


def choose_precision(
    quantization: str, device: str, model_id: str, token: str | None, max_memory_gib: float = float("inf")
) -> str:
    """'bf16', 'fp8', 'int8', '4bit' or 'fp32' (CPU; 'int8' and 'fp8' also run there, computing in fp32).

    'auto' takes fp8 weights on a GPU where they were measured faster at 4B and 27B (Hopper,
    docs/benchmarks.md), else the most precise weights that leave half of the memory budget for activations.
    """
    if quantization == "fp8" and device != "cpu" and not has_fp8_tensor_cores():
        name = torch.cuda.get_device_name()
        raise UserError(
            f"--quantization fp8 needs FP8 tensor cores (compute capability 8.9 or later); {name}",
            "Use --quantization int8 (the same memory, bf16 compute) or auto.",
        )
    if quantization in ("int8", "fp8"):
        return quantization
    if device == "cpu":
        if quantization == "4bit":
            raise UserError(
                "--quantization 4bit needs a CUDA GPU (bitsandbytes)",
                "Use --quantization auto or none on CPU.",
            )
        return "fp32"
    if quantization != "auto":
        return "4bit" if quantization == "4bit" else "bf16"
    with torch.device("meta"):
        shell = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_id, token=token))
    bf16 = 2 * sum(p.numel() for p in shell.parameters())
    int8 = int8_weight_bytes(shell, LANGUAGE_MODEL_LINEAR)
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    budget = min(total, max_memory_gib * 2**30)
    precision = precision_for(bf16, int8, budget, total, fp8=fp8_measured_faster())
    log.info(
        "weights: %.1f GiB in bf16, %.1f GiB in int8 or fp8; memory budget %.1f GiB: %s",
        bf16 / 2**30,
        int8 / 2**30,
        budget / 2**30,
        precision,
    )
    return precision


def precision_for(
    bf16_bytes: float, int8_bytes: float, budget: float, gpu_bytes: float, fp8: bool = False
) -> str:
    """Where fp8 was measured faster (`fp8`), fp8 wherever its weights (int8's size) take at most
    WEIGHT_MEMORY_SHARE of the budget and their bf16 form fits the GPU while it loads. Otherwise the most
    precise weights that take at most that share (int8 also needing the bf16 load to fit); 4-bit when none
    does."""
    int8_fits = int8_bytes <= WEIGHT_MEMORY_SHARE * budget and bf16_bytes <= LOAD_MEMORY_SHARE * gpu_bytes
    if fp8 and int8_fits:
        return "fp8"
    if bf16_bytes <= WEIGHT_MEMORY_SHARE * budget:
        return "bf16"
    return "int8" if int8_fits else "4bit"


def store_weights(model: PreTrainedModel, precision: str) -> None:
    """int8 or fp8 storage of the language model's linear weights, converted in place from the loaded ones;
    other precisions are stored as loaded."""
    if precision in ("int8", "fp8"):
        layer = Int8Linear if precision == "int8" else Fp8Linear
        count = quantize_linear_layers(model, LANGUAGE_MODEL_LINEAR, layer)
        log.info("%d linear layers of the language model stored in %s", count, precision)
