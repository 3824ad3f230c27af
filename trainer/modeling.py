"""Processor and model: Gemma 3 with LoRA on the language model, bf16 when it fits, else 4-bit NF4."""

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

log = logging.getLogger(__name__)

# The vision tower stays frozen and without adapters: LoRA inside it doubles the step time at 4B
# (docs/benchmarks) for no gain in the Gemma 3 recipes.
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# bf16 weights may take this share of the GPU memory budget; the rest is for LoRA states and activations,
# which the memory plan fits by checkpointing layers (27B: 51 GiB of weights in an 85 GiB budget).
BF16_MEMORY_SHARE = 0.7


def check_model_id(model_id: str) -> None:
    """A path that is not a model directory is a typo or a missing mount, not a Hub id."""
    path = Path(model_id).expanduser()
    looks_local = path.exists() or model_id.startswith(("/", ".", "~"))
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"model directory {model_id} does not exist or has no config.json")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible")
    return device


def choose_precision(
    quantization: str, device: str, model_id: str, token: str | None, max_memory_gib: float = float("inf")
) -> str:
    """'bf16', '4bit' or 'fp32' (CPU). 'auto' quantizes only when bf16 weights would not leave room."""
    if device == "cpu":
        if quantization == "4bit":
            raise UserError("--quantization 4bit needs a CUDA GPU (bitsandbytes); use auto or none on CPU")
        return "fp32"
    if quantization != "auto":
        return "4bit" if quantization == "4bit" else "bf16"
    with torch.device("meta"):
        shell = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_id, token=token))
    weights = 2 * sum(p.numel() for p in shell.parameters())
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    budget = min(total, max_memory_gib * 2**30)
    precision = "bf16" if weights <= BF16_MEMORY_SHARE * budget else "4bit"
    log.info("bf16 weights %.1f GiB, memory budget %.1f GiB: %s", weights / 2**30, budget / 2**30, precision)
    return precision


def load_processor(model_id: str, token: str | None) -> ProcessorMixin:
    try:
        return AutoProcessor.from_pretrained(model_id, token=token)
    except OSError as error:
        raise UserError(f"cannot load the processor of {model_id}: {str(error).splitlines()[0]}") from None


def load_base_model(model_id: str, precision: str, device: str, token: str | None) -> PreTrainedModel:
    kwargs: dict = {"dtype": torch.float32 if precision == "fp32" else torch.bfloat16}
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    try:
        return AutoModelForImageTextToText.from_pretrained(
            model_id, device_map={"": device}, token=token, **kwargs
        )
    except OSError as error:  # missing or partial weights, a gated repo without a token
        raise UserError(
            f"cannot load the model weights of {model_id}: {str(error).splitlines()[0]}"
        ) from None


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
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "model %s (%s): %d of %d parameters trainable (LoRA r=%d)", name, precision, trainable, total, lora_r
    )
    return model
