"""The speed levers, switched on at one seam: the story (trainer/__main__.py) calls what this module
exports and names its GPU passes with trainer.speed.out_of_memory; the rest of the trainer imports nothing
from trainer.speed.

- weights: which base weights fit the memory budget, and int8/fp8 storage (`choose_precision`,
  `load_model`);
- LoRA dropout fused into each adapter's first projection (`with_adapters`);
- before training: the memory cap, the image features of both splits, compiled layers (`speed_up`);
- the training batch and gradient checkpointing, planned from measured steps, and Trainer's per-step walks
  over the model cut (`build_trainer`);
- evaluation batches planned from measured passes (`planned_batch`);
- which GPU pass ran out of memory (`trainer.speed.out_of_memory`);
- compiled graphs and the memory plan reused from the job's earlier executions (`open_warm_start`).

docs/benchmarks.md has the measurements behind each lever; docs/trainer.md the flags that switch them.
"""

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Container
from pathlib import Path

import datasets
from peft import PeftModel
from transformers import PreTrainedModel, ProcessorMixin
from trl import SFTTrainer

from trainer import UserError
from trainer.container import SharedMemory, compile_toolchain_problem, pixel_bytes
from trainer.data import ChatFormat, PetData
from trainer.evaluate import predict_ranked
from trainer.modeling import LANGUAGE_MODEL_LINEAR, add_adapters, load_base_model
from trainer.speed.features import ImageFeatures
from trainer.speed.host_work import skip_repeated_mode_switches, zero_only_trainable_grads
from trainer.speed.layers import compile_layers, decoder_layers, set_checkpointed_layers
from trainer.speed.lora_dropout import fuse_lora_dropout
from trainer.speed.memory import (
    GIB,
    Plan,
    apply_memory_budget,
    compile_as_probes,
    measure_pass,
    memory_budget,
    pass_batch,
    plan_memory,
)
from trainer.speed.warm_start import WarmStart
from trainer.speed.weights import choose_precision, store_weights
from trainer.train import RunState, make_trainer, probe_step, set_batch_size, sft_config

__all__ = [
    "CPU_BATCH_SIZE",
    "GIB",
    "ImageFeatures",
    "Plan",
    "WarmStart",
    "build_trainer",
    "check_compile",
    "choose_precision",
    "eval_workers",
    "loader_workers",
    "load_model",
    "memory_budget",
    "open_warm_start",
    "planned_batch",
    "speed_up",
    "with_adapters",
]

log = logging.getLogger(__name__)

# --batch-size auto without a GPU to measure: the batch the tiny model's CPU runs were tuned with.
CPU_BATCH_SIZE = 8


def load_model(
    model_id: str,
    precision: str,
    device: str,
    token: str | None,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
) -> PeftModel:
    """The base model with fresh LoRA adapters on the language model's linear layers; all else frozen.

    int8 and fp8 weights are converted from the loaded ones before the adapters wrap their layers.
    """
    model = load_base_model(model_id, precision, device, token)
    store_weights(model, precision)
    return with_adapters(model, precision, lora_r, lora_alpha, lora_dropout, name=model_id)


def with_adapters(
    model: PreTrainedModel,
    precision: str,
    lora_r: int,
    lora_alpha: int,
    lora_dropout: float,
    target_modules: str = LANGUAGE_MODEL_LINEAR,
    name: str = "",
) -> PeftModel:
    """PEFT's LoRA adapters (trainer.modeling.add_adapters), their dropout fused into lora_A."""
    model = add_adapters(model, precision, lora_r, lora_alpha, lora_dropout, target_modules, name)
    fuse_lora_dropout(model)
    return model


def check_compile(args: argparse.Namespace, device: str) -> None:
    """torch.compile on CUDA needs a C compiler, Python headers and libcuda at run time (Triton).

    Without them, --compile on is an error; auto goes on without compiling (slower, same results).
    """
    if device != "cuda" or args.compile == "off":
        return
    problem = compile_toolchain_problem()
    if problem is None:
        return
    if args.compile == "on":
        raise UserError(
            f"--compile on: torch.compile cannot run here: {problem}",
            "the image needs gcc (or $CC), the Python headers and the driver's libcuda.so.1 "
            "(docs/container.md); or run with --compile off",
        )
    log.warning(
        "torch.compile cannot run here (%s): training without it, slower (docs/container.md)",
        problem,
    )
    args.compile = "off"


def speed_up(
    args: argparse.Namespace,
    model: PeftModel,
    processor: ProcessorMixin,
    data: PetData,
    device: str,
    workers: int | None = None,
) -> ImageFeatures | None:
    """The levers that come before training: memory cap, image features of both splits, compiled layers.

    `workers`: data-loader workers for batches of --eval-batch-size images (default: as many as fit).
    """
    if workers is None:
        workers = eval_workers(args, processor, device, SharedMemory.measure())
    if device == "cuda":
        budget = apply_memory_budget(args.max_memory_gib, device)
        log.info("GPU memory capped at %.1f GiB", budget / GIB)
    features = None
    if args.cache_image_features:
        features = ImageFeatures()
        features.install(model)
        start = time.perf_counter()
        # On a GPU the batches are planned from the pass's measured memory, up to --eval-batch-size.
        memory = features.measure(model, processor, data.train, budget) if device == "cuda" else None
        count = sum(
            features.fill(model, processor, split, args.eval_batch_size, workers, memory)
            for split in (data.train, data.test)
        )
        log.info("image features of %d images in %.1f s", count, time.perf_counter() - start)
    if compiles(args, device):
        compile_layers(model)
    return features


def compiles(args: argparse.Namespace, device: str) -> bool:
    return args.compile == "on" or (args.compile == "auto" and device == "cuda")


def open_warm_start(args: argparse.Namespace, model: PeftModel, precision: str, device: str) -> WarmStart:
    """The job's shared warm-start directory for this model and these settings (--compile-cache), with
    the compiled graphs of earlier executions loaded: call it before anything compiles."""
    lora = (args.lora_r, args.lora_alpha, args.lora_dropout)
    warm = WarmStart.open(
        args.output_dir, args.compile_cache, model, precision, device, lora, compiles(args, device)
    )
    warm.load_artifacts()
    return warm


def build_trainer(
    args: argparse.Namespace,
    model: PeftModel,
    processor: ProcessorMixin,
    data: PetData,
    chat: ChatFormat,
    device: str,
    run_dir: Path,
    features: ImageFeatures | None,
    state: RunState | None = None,
    shm: SharedMemory | None = None,
    warm: WarmStart | None = None,
) -> tuple[SFTTrainer, Plan]:
    """SFTTrainer with the batch and gradient checkpointing of the memory plan (measured on GPU), of an
    earlier attempt of the task (`state`), or of an earlier execution of the job (`warm`)."""
    state = state or RunState(run_dir, attempt=0)
    warm = warm or WarmStart(None)
    train = data.train
    workers = loader_workers(device)
    if features is not None and features.has_all(train["image_key"]):
        # Batches carry image keys: decoding the images would be wasted work.
        train, workers = train.remove_columns("image"), 0
    first_batch = args.batch_size or (1 if device == "cuda" else CPU_BATCH_SIZE)
    config = sft_config(args, run_dir, device, first_batch, workers)
    trainer = make_trainer(
        model, processor, PetData(train, data.test, data.class_names), chat, config, features
    )
    skip_repeated_mode_switches(model)
    zero_only_trainable_grads(model)
    layers = len(decoder_layers(model))
    examples = [data.train[index] for index in range(min(2, len(data.train)))]
    request = plan_request(args, trainer, examples)
    plan, warm.plan_source = None, None
    if state.get("plan"):
        plan, warm.plan_source = Plan(**state.get("plan")), "earlier attempt"
    elif stored := warm.plan(request):
        plan, warm.plan_source = stored, "earlier execution"
    if plan is not None:
        log.info(
            "batch %d, gradient checkpointing on %d layers: the plan of an %s",
            plan.batch_size,
            plan.checkpointed_layers,
            warm.plan_source,
        )
        set_checkpointed_layers(model, plan.checkpointed_layers)
        if device == "cuda" and warm.compile_cache == "loaded":
            compile_as_probes(model, probe_step(trainer), examples, plan.checkpointed_layers)
    elif device == "cuda" and not (args.batch_size and args.gradient_checkpointing != "auto"):
        budget = memory_budget(args.max_memory_gib, device)
        plan = plan_memory(
            model, probe_step(trainer), examples, budget, args.batch_size, args.gradient_checkpointing
        )
        warm.plan_source = "measured"
    else:
        plan = Plan(first_batch, layers if args.gradient_checkpointing == "on" else 0)
        set_checkpointed_layers(model, plan.checkpointed_layers)
        warm.plan_source = "flags"
    set_batch_size(trainer, plan.batch_size)
    state.save("plan", dataclasses.asdict(plan))
    if warm.plan_source != "earlier execution":
        warm.keep_plan(request, plan)
    if workers:
        shm = shm or SharedMemory.measure()
        batch_bytes = plan.batch_size * pixel_bytes(processor)
        trainer.args.dataloader_num_workers = shm.workers(workers, batch_bytes, "training batches")
    return trainer, plan


def plan_request(args: argparse.Namespace, trainer: SFTTrainer, examples: list[dict]) -> dict:
    """What a stored plan must have been made for, besides the warm start's key: the budget, the batch and
    checkpointing asked for, the image features' use and the sequence length of the training samples."""
    length = trainer.data_collator(examples[:1])["input_ids"].shape[1] if examples else 0
    return {
        "max_memory_gib": args.max_memory_gib,
        "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "cache_image_features": args.cache_image_features,
        "tokens": int(length),
    }


def eval_workers(args: argparse.Namespace, processor: ProcessorMixin, device: str, shm: SharedMemory) -> int:
    """Data-loader workers for batches of --eval-batch-size images (features, evaluation) fitting /dev/shm."""
    batch_bytes = args.eval_batch_size * pixel_bytes(processor)
    return shm.workers(loader_workers(device), batch_bytes, "evaluation batches")


def planned_batch(
    method: str,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    chat: ChatFormat,
    split: datasets.Dataset,
    class_names: list[str],
    requested: int,
    features: Container[int] | None,
    budget: int,
) -> int:
    """The largest evaluation batch up to `requested` that fits the GPU memory budget, measured by
    predicting the split's first one and two images (scoring packs 37 answers behind each prompt, and
    27B's 4-bit weights leave an L4 a few GiB)."""

    def run(count: int) -> None:
        probe = split.select(range(min(count, len(split))))
        predict_ranked(method, model, processor, chat, probe, class_names, count, features)

    return pass_batch(f"evaluation ({method})", requested, measure_pass(run, budget))


def loader_workers(device: str) -> int:
    """Dataloader workers that decode and resize images next to the GPU's work; none on CPU."""
    if device == "cpu":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 2))
