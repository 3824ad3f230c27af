"""Processor and model: Gemma 3 with LoRA on the language model; bf16, fp8, int8 or 4-bit NF4 base weights."""

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from trainer import UserError
from trainer.fp8_weights import Fp8Linear, fp8_measured_faster, has_fp8_tensor_cores
from trainer.int8_weights import Int8Linear, int8_weight_bytes, quantize_linear_layers
from trainer.lora_dropout import fuse_lora_dropout

log = logging.getLogger(__name__)

# The vision tower stays frozen and without adapters: LoRA inside it doubles the step time at 4B
# (docs/benchmarks) for no gain in the Gemma 3 recipes.
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Weights may take this share of the GPU memory budget; the rest is for activations, whose room sets the
# batch. bf16 weights above it (27B: 51 of 85 GiB) would leave room for batch 2 only: int8 storage is faster
# there (docs/benchmarks.md), and 4-bit when even int8 weights do not leave it.
WEIGHT_MEMORY_SHARE = 0.5
# int8 and fp8 weights are made from bf16 ones on the GPU: the bf16 model must fit the GPU while it loads.
LOAD_MEMORY_SHARE = 0.9


def check_model_id(model_id: str) -> None:
    """A path that is not a model directory is a typo or a missing mount, not a Hub id."""
    path = Path(model_id).expanduser()
    looks_local = path.exists() or model_id.startswith(("/", ".", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise UserError(
            f"model directory {model_id} does not exist or has no config.json",
            "Pass the directory that holds config.json and the weights (save_pretrained's output), or a "
            "Hub model id.",
        )


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        # A CUDA build on a driver older than its CUDA version sees no GPU: the L4's 535 under CUDA 13.
        hint = torch.version.cuda and (
            f"this torch {torch.__version__} is built for CUDA {torch.version.cuda} and needs a driver that "
            "supports it (CUDA 13: 580 or newer; Cloud Run's RTX PRO 6000 has 580, its L4 535; "
            "docs/container.md)"
        )
        # Another attempt may land on a host whose GPU is visible: not recorded as recurring.
        raise UserError(
            "--device cuda: no CUDA GPU is visible",
            hint or "Run where a CUDA GPU is visible, or pass --device cpu.",
            recurs=False,
        )
    return device


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


def load_processor(model_id: str, token: str | None) -> ProcessorMixin:
    try:
        return AutoProcessor.from_pretrained(model_id, token=token)
    except OSError as error:
        raise UserError(
            f"cannot load the processor of {model_id}: {str(error).splitlines()[0]}",
            "The model needs its processor and tokenizer files next to config.json; a gated Hub model needs "
            "HF_TOKEN of an account that accepted its licence.",
        ) from None


def load_base_model(model_id: str, precision: str, device: str, token: str | None) -> PreTrainedModel:
    kwargs: dict = {"dtype": torch.float32 if precision == "fp32" or device == "cpu" else torch.bfloat16}
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        # use_kernels=False: transformers (5.25, the lock's) otherwise swaps layers for compiled kernels it
        # downloads from the Hub at load time, unpinned by requirements.lock; offline, or with a publisher
        # it cannot verify, the load fails (seen on an H200 with the lock's transformers, docs/container.md).
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, device_map={"": device}, token=token, use_kernels=False, **kwargs
        )
    except OSError as error:  # missing or partial weights, a gated repo without a token
        raise UserError(
            f"cannot load the model weights of {model_id}: {str(error).splitlines()[0]}",
            "The model directory needs its weights (*.safetensors) next to config.json; a gated Hub model "
            "needs HF_TOKEN of an account that accepted its licence.",
        ) from None
    if precision in ("int8", "fp8"):
        layer = Int8Linear if precision == "int8" else Fp8Linear
        count = quantize_linear_layers(model, LANGUAGE_MODEL_LINEAR, layer)
        log.info("%d linear layers of the language model stored in %s", count, precision)
    return model


def load_model(
    model_id: str,
    precision: str,
    device: str,
    token: str | None,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
) -> PeftModel:
    """The base model with fresh LoRA adapters on the language model's linear layers; all else frozen."""
    model = load_base_model(model_id, precision, device, token)
    return add_adapters(model, precision, lora_r, lora_alpha, lora_dropout, name=model_id)


def add_adapters(
    model: PreTrainedModel,
    precision: str,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: str = LANGUAGE_MODEL_LINEAR,
    name: str = "",
) -> PeftModel:
    if precision == "4bit":
        # Gradient checkpointing is planned later (trainer.speed), on the layers that need it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    fuse_lora_dropout(model)
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model %s (%s): %d of %d parameters trainable (LoRA r=%d)", name, precision, trainable, total, lora_r
    )
    return model
