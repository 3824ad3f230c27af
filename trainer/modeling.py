"""Processor and model: Gemma 3 with LoRA on the language model; bf16, fp32 or 4-bit NF4 base weights as
loaded (int8 and fp8 storage is a speed lever: trainer.speed.weights)."""

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
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
    return model


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
