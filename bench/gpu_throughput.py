"""GPU training and evaluation throughput of the trainer on real-size, random-init Gemma 3.

    python bench/gpu_throughput.py --arch 4b --configs reference,ours --out bench/results
    python bench/gpu_throughput.py --arch 27b --configs reference,ours --max-memory-gib 85
    python bench/gpu_throughput.py --smoke          # CPU, tiny config, every code path end to end
    python bench/gpu_throughput.py --quality        # tiny model trained with and without the levers
    python bench/gpu_throughput.py --arch 27b --configs ours --compile-cache DIR   # twice: cold, then warm

Everything runs through the trainer's own code: its flags (trainer.flags.parse_args), model setup
(trainer.speed.with_adapters), levers (trainer.speed.speed_up / build_trainer: memory cap, image
features, compiled layers, batch and checkpointing plan), TRL SFTTrainer with the answer-only collator, and
the evaluation function (trainer.evaluate.predict_ranked). Only the weights are random (their values do not
change speed) and the data is synthetic: 896x896 JPEGs, and the prompt padded to the real sample length
(470 tokens: 256 image tokens, 208 prompt and template tokens, answer + end of turn, docs/benchmarks.md).

Each configuration builds a fresh model; one JSON line per measured (configuration, phase) goes to
OUT/gpu.jsonl, with the FLOP count behind the MFU column.
"""

import argparse
import collections
import dataclasses
import datetime
import functools
import gc
import json
import logging
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_settings  # noqa: E402

from trainer import UserError  # noqa: E402
from trainer.data import PROMPT, PetData, chat_format, load_pets, readable_name  # noqa: E402
from trainer.evaluate import predict_ranked  # noqa: E402
from trainer.export import versions  # noqa: E402
from trainer.flags import parse_args  # noqa: E402
from trainer.modeling import LANGUAGE_MODEL_LINEAR  # noqa: E402
from trainer.offline.synthetic import BREEDS, LIST_HEADER  # noqa: E402
from trainer.offline.tiny import CHAT_TEMPLATE, build_tokenizer, tiny_shapes  # noqa: E402
from trainer.speed import (  # noqa: E402
    build_trainer,
    choose_precision,
    memory_budget,
    open_warm_start,
    planned_batch,
    speed_up,
    with_adapters,
)
from trainer.speed.weights import store_weights  # noqa: E402
from trainer.train import RunState  # noqa: E402

log = logging.getLogger("bench")

CONFIGS = Path(__file__).resolve().parent / "configs"
# bf16 dense matmul rate of one H200 measured here (8192^3, random data): the MFU denominator.
PEAK_FLOPS = 790e12
# The reference sample: 256 image tokens + 208 prompt and template tokens + answer and end of turn.
PROMPT_TOKENS = 464
# The reference script's LoRA targets: these names also match SigLIP's q/k/v projections.
REFERENCE_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# name -> (trainer flags, LoRA target regex, evaluation method).
VARIANTS: dict[str, tuple[list[str], str, str]] = {
    "reference": (
        [
            "--quantization", "4bit", "--batch-size", "1", "--gradient-checkpointing", "off",
            "--compile", "off", "--no-cache-image-features", "--eval-batch-size", "8",
        ],
        REFERENCE_TARGETS,
        "generate",
    ),
    "reference-bf16": (
        [
            "--quantization", "none", "--batch-size", "1", "--gradient-checkpointing", "off",
            "--compile", "off", "--no-cache-image-features", "--eval-batch-size", "8",
        ],
        REFERENCE_TARGETS,
        "generate",
    ),
    "ours": ([], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-bf16": (["--quantization", "none"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-bf16-b8": (["--quantization", "none", "--batch-size", "8"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-int8": (["--quantization", "int8"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-fp8": (["--quantization", "fp8"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-no-compile": (["--compile", "off"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-no-feature-cache": (["--no-cache-image-features"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-b8": (["--batch-size", "8"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-b32": (["--batch-size", "32"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-bf16-b32": (["--quantization", "none", "--batch-size", "32"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-b16": (["--batch-size", "16"], LANGUAGE_MODEL_LINEAR, "score"),
    "ours-no-dropout": (["--lora-dropout", "0"], LANGUAGE_MODEL_LINEAR, "score"),
    # The smallest 27B training there is (an L4's 22 GiB): 4-bit, batch 1, every layer recomputed; image
    # features and scoring 4 images at a time, since 16 overflow the budget in SigLIP.
    "ours-4bit-b1": (
        [
            "--quantization", "4bit", "--batch-size", "1", "--gradient-checkpointing", "on",
            "--eval-batch-size", "4",
        ],
        LANGUAGE_MODEL_LINEAR,
        "score",
    ),
}  # fmt: skip


def write_images(root: Path, per_class: int, test_per_class: int, size: int, seed: int = 0) -> None:
    """896x896 JPEGs (noise over the breed's colour blocks, so they cost a real decode) in the official
    Oxford-IIIT Pet layout that trainer.data.load_pets reads."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    rows, trainval, test = [], [], []
    for index, breed in enumerate(BREEDS):
        for number in range(1, per_class + test_per_class + 1):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            draw = ImageDraw.Draw(image)
            half = size // 2
            for quadrant in range(4):
                x, y = quadrant % 2 * half, quadrant // 2 * half
                colour = (
                    tuple(int(c) for c in rng.integers(0, 256, 3)) if (index >> quadrant) & 1 else (0, 0, 0)
                )
                draw.rectangle((x + 8, y + 8, x + half - 8, y + half - 8), outline=colour, width=12)
            name = f"{breed}_{number}"
            image.save(root / "images" / f"{name}.jpg", quality=90)
            row = f"{name} {index + 1} 1 1\n"
            rows.append(row)
            (trainval if number <= per_class else test).append(row)
    (root / "annotations" / "list.txt").write_text(LIST_HEADER + "".join(rows))
    (root / "annotations" / "trainval.txt").write_text("".join(trainval))
    (root / "annotations" / "test.txt").write_text("".join(test))


def build_processor(image_size: int, tokens_per_image: int):
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    # The PIL processor even where torchvision is installed (the lent GPU machines have it): the image has
    # no torchvision, so AutoProcessor resolves the checkpoints' "Gemma3ImageProcessor" to this one there.
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )


def pad_prompt(processor, class_names: list[str], target: int) -> str:
    """The trainer's question (trainer.data.PROMPT) made, as the chat template renders it with its image,
    exactly `target` tokens: the question, the breeds to choose from (as the reference script lists them),
    then filler words."""
    choices = " Choose one of: " + ", ".join(class_names) + "."
    words = (PROMPT + choices).split(" ")

    def length(prompt: str) -> int:
        chat = chat_format(processor, class_names, prompt)
        image = Image.new("RGB", (32, 32))
        encoded = processor(
            text=[chat.prompt], images=[[image]], add_special_tokens=False, return_tensors="pt"
        )
        return encoded["input_ids"].shape[1]

    while len(words) > 1 and length(" ".join(words)) > target:
        words.pop()
    prompt = " ".join(words)
    while (current := length(prompt)) < target:
        prompt += " ." * max(1, (target - current) // 2)
    if current != target:
        raise RuntimeError(f"prompt of {current} tokens, wanted {target}")
    return prompt


def build_model(arch: str, processor, device: str):
    """Random-init Gemma 3 from the published config, its special token ids set to the bench tokenizer's."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    raw = json.loads((CONFIGS / f"gemma-3-{arch}-it.json").read_text())
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    raw.update(
        image_token_index=ids("<image_soft_token>"),
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    raw["text_config"].update(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    config = Gemma3Config(**raw)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # _init_weights zeroes the projector; a trained one is not zero
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        projection.normal_(0.0, projection.shape[0] ** -0.5)
    model.generation_config.eos_token_id = raw["eos_token_id"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.requires_grad_(False)


def tiny_config(processor) -> dict:
    """trainer.offline.tiny's shapes, for --smoke (longer positions: the smoke run packs the 37 answers)."""
    return tiny_shapes(len(processor.tokenizer), max_positions=1024)


def quantize_nf4(model, skip: tuple[str, ...] = ("lm_head", "multi_modal_projector")) -> None:
    """What from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute)) does to
    the weights, done in place on a random-init model (there is no checkpoint to load)."""
    import bitsandbytes as bnb

    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is not torch.nn.Linear or any(part in full for part in skip):
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
            quantized.weight = weight.to(child.weight.device)
            if child.bias is not None:
                quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, quantized)
            del child
    model.is_loaded_in_4bit = True
    gc.collect()
    torch.cuda.empty_cache()


@dataclass
class Flops:
    """Matmul FLOPs per sample, executed work only (recomputation by gradient checkpointing not counted)."""

    train: float
    eval_score: float
    vision: float  # one image through SigLIP + projector, forward
    tokens: int


def count_flops(model, prompt_tokens: int, answers: list[list[int]], vision_lora: bool) -> Flops:
    """2 x multiply-adds. Frozen linear: forward 1x, backward 1x (input gradient only); LoRA: 3x;
    attention (QK^T and AV; causal half for text, full for SigLIP): forward 1x, backward 2x; lm_head on the
    answer positions only (TRL's fused head): forward + input gradient."""
    text, vision = model.config.text_config, model.config.vision_config
    linear = {"language_model": 0.0, "vision_tower": 0.0}
    lora = {"language_model": 0.0, "vision_tower": 0.0}
    for name, module in model.named_modules():
        part = next((key for key in linear if key in name), None)
        if part is None or "lora_" in name:
            continue
        if isinstance(module, torch.nn.Linear):
            linear[part] += module.in_features * module.out_features
        elif hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            adapter = module.lora_A["default"]
            lora[part] += adapter.out_features * (adapter.in_features + module.lora_B["default"].out_features)
    answer = sum(len(a) for a in answers) / len(answers)
    seq = prompt_tokens + answer
    patches = (vision.image_size // vision.patch_size) ** 2
    width = text.num_attention_heads * text.head_dim
    text_attention = 2 * seq * seq * width * text.num_hidden_layers
    vision_attention = 4 * patches * patches * vision.hidden_size * vision.num_hidden_layers
    vision_forward = 2 * linear["vision_tower"] * patches + vision_attention
    head = 2 * text.hidden_size * text.vocab_size * answer
    train = (
        2 * (2 * linear["language_model"] * seq)
        + 3 * text_attention
        + 3 * 2 * lora["language_model"] * seq
        + 2 * head
    )
    if vision_lora:  # backward through the vision tower (input gradients) and SigLIP's LoRA
        train += vision_forward + vision_attention + 3 * 2 * lora["vision_tower"] * patches
    # Scoring: the prompt once and all answers packed in one sequence; logits at the answer positions.
    answer_tokens = sum(len(a) for a in answers)
    packed = prompt_tokens + answer_tokens
    eval_score = (
        2 * linear["language_model"] * packed
        + 2 * packed * packed * width * text.num_hidden_layers
        + 2 * text.hidden_size * text.vocab_size * answer_tokens
    )
    return Flops(train, eval_score, vision_forward, round(seq))


class StepTimer:
    """Synchronized wall time from the end of the warm-up steps to the end of the timed steps."""

    def __init__(self, warmup: int, steps: int, device: str) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    sync(device)
                    timer.start = time.perf_counter()
                    reset_peak(device)
                if state.global_step == warmup + steps:
                    sync(device)
                    timer.end = time.perf_counter()

        self.callback = Callback()
        self.start = self.end = 0.0


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> tuple[float, float]:
    if device != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_reserved() / 2**30, torch.cuda.max_memory_allocated() / 2**30


def gpu_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def record(out: Path, row: dict) -> None:
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    with (out / "gpu.jsonl").open("a") as file:
        file.write(line + "\n")


def measure(
    name: str,
    arch: str,
    phases: list[str],
    bench: argparse.Namespace,
    dataset: Path,
    data: PetData,
    processor,
    out: Path,
) -> None:
    """One configuration: fresh model, the trainer's setup, timed training steps, timed evaluation."""
    flags, targets, eval_method = VARIANTS[name]
    device = "cuda" if torch.cuda.is_available() and not bench.smoke else "cpu"
    args = parse_args(
        [
            "--model-id", "random-init", "--dataset", str(dataset), "--device", device,
            "--max-memory-gib", str(bench.max_memory_gib), "--checkpoint-strategy", "no",
            "--logging-steps", str(bench.logging_steps), "--train-size", str(bench.train_size),
            "--eval-size", str(bench.eval_size), *warm_start_flags(bench), *flags, *bench.flags.split(),
        ]
    )  # fmt: skip
    chat = chat_format(processor, data.class_names, bench.question)
    if device == "cuda":
        # An earlier configuration's --max-memory-gib cap stays on the process; the bf16 model is built
        # before this one's cap applies, as the trainer loads it before capping.
        torch.cuda.set_per_process_memory_fraction(1.0)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = build_tiny(processor) if bench.smoke else build_model(arch, processor, device)
    # The trainer's own choice of weights for this config and budget, as it makes it from a model directory.
    with tempfile.TemporaryDirectory() as config_dir:
        model.config.save_pretrained(config_dir)
        precision = choose_precision(args.quantization, device, config_dir, None, args.max_memory_gib)
    if precision == "4bit":
        quantize_nf4(model)
    store_weights(model, precision)
    model = with_adapters(model, precision, args.lora_r, args.lora_alpha, args.lora_dropout, targets, name)
    log.info("%s: model ready in %.1f s", name, time.perf_counter() - start)
    flops = count_flops(model, PROMPT_TOKENS, chat.answers, targets == REFERENCE_TARGETS)
    common = {
        "arch": "tiny" if bench.smoke else arch,
        "config": name,
        "gpu": gpu_name(device),
        "date": datetime.date.today().isoformat(),
        "precision": precision,
        "max_memory_gib": args.max_memory_gib,
        **({"torch_settings": bench.set} if bench.set else {}),
        **({"extra_flags": bench.flags} if bench.flags else {}),
    }

    start = time.perf_counter()
    # Before anything compiles: a second process with the same --compile-cache starts warm.
    warm = open_warm_start(args, model, precision, device)
    features = speed_up(args, model, processor, data, device)
    setup_s = time.perf_counter() - start
    feature_rate = None
    if features is not None and features.filled:
        feature_rate = features.filled / features.fill_seconds
        log.info("%s: image features %.1f images/s", name, feature_rate)

    if "eval" in phases:
        # generate runs at ~1 sample/s at 27B: two batches are enough to time it.
        samples = bench.eval_samples if eval_method == "score" else 2 * args.eval_batch_size
        split = data.test.select(range(min(samples, len(data.test))))
        workers = 0 if device == "cpu" else 4
        batch = args.eval_batch_size
        if device == "cuda":  # as the trainer does: the largest batch up to --eval-batch-size that fits
            budget = memory_budget(args.max_memory_gib, device)
            batch = planned_batch(eval_method, model, processor, chat, split, data.class_names, batch,
                                  features, budget)  # fmt: skip
        # Warm-up on one batch (kernels, compiled graphs), then the timed pass.
        warmup = split.select(range(min(batch, len(split))))
        predict_ranked(eval_method, model, processor, chat, warmup, data.class_names, batch, features,
                workers)  # fmt: skip
        # --eval-passes N times N passes over the images in one loader (its workers start once, as in the
        # trainer's evaluation of a whole test split), without drawing other images.
        timed = datasets.concatenate_datasets([split] * bench.eval_passes)
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        predict_ranked(eval_method, model, processor, chat, timed, data.class_names, batch, features,
                workers)  # fmt: skip
        sync(device)
        seconds = time.perf_counter() - start
        rate = len(timed) / seconds
        reserved, allocated = peak_gib(device)
        if eval_method == "score":
            per_sample = flops.eval_score
            tokens = PROMPT_TOKENS + sum(len(a) for a in chat.answers)
        else:  # generate: prompt forward + up to max_new_tokens decode steps (random weights never stop)
            new_tokens = max(len(a) for a in chat.answers) + 8
            per_sample = (
                flops.eval_score
                * (PROMPT_TOKENS + new_tokens)
                / (PROMPT_TOKENS + sum(len(a) for a in chat.answers))
            )
            tokens = PROMPT_TOKENS + new_tokens
        row = {
            **common,
            "phase": "eval",
            "method": eval_method,
            "batch_size": batch,
            "samples_per_s": round(rate, 3),
            "tokens_per_s": round(rate * tokens, 1),
            "peak_gib": round(reserved, 2),
            "peak_allocated_gib": round(allocated, 2),
            "mfu": round(rate * per_sample / PEAK_FLOPS, 4),
            "flops_per_sample": per_sample,
            "samples": len(timed),
        }
        if feature_rate:
            # The first evaluation also pays for its images' features; later ones reuse them.
            row["samples_per_s_with_feature_pass"] = round(1 / (1 / rate + 1 / feature_rate), 3)
            row["feature_images_per_s"] = round(feature_rate, 2)
        record(out, row)
        if bench.profile:
            profiled = split.select(range(min(2 * batch, len(split))))
            path = out / f"profile-{common['arch']}-{name}-eval.txt"
            run = functools.partial(predict_ranked, eval_method, model, processor, chat, profiled,
                                    data.class_names, batch, features, workers)  # fmt: skip
            profile_eval(path, device, run)

    # Each repeat trains the adapters from where the first started, so that their losses are comparable;
    # kept on the host, so that the plan's memory is the same as without repeats.
    initial = {key: value.to("cpu", copy=True) for key, value in model.state_dict().items() if "lora_" in key}
    plan = None
    for repeat in range(bench.repeats if "train" in phases else 0):
        if repeat:
            model.load_state_dict(initial, strict=False)
        run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        # Later repeats reuse the first one's plan, as a retried task does: no memory probes.
        state = RunState(run_dir, attempt=0)
        if plan is not None:
            state.save("plan", dataclasses.asdict(plan))
        start = time.perf_counter()
        trainer, plan = build_trainer(
            args, model, processor, data, chat, device, run_dir, features, state, warm=warm
        )
        plan_s = time.perf_counter() - start
        if not repeat:
            trainer.add_callback(warm.callback())
        batch = trainer.args.per_device_train_batch_size
        steps = bench.repeat_steps if repeat and bench.repeat_steps else bench.steps
        timer = StepTimer(bench.warmup, steps, device)
        trainer.add_callback(timer.callback)
        trainer.args.max_steps = bench.warmup + steps
        start = time.perf_counter()
        profiled = None
        last = repeat == bench.repeats - 1
        if bench.profile and last:
            profiled = profile_steps(trainer, bench, device, steps)
        elif bench.host_profile and last:
            host_profile_steps(trainer, bench, steps, out / f"host-profile-{common['arch']}-{name}.txt")
        else:
            trainer.train()
        total_s = time.perf_counter() - start
        seconds = timer.end - timer.start
        rate = steps * batch / seconds
        reserved, allocated = peak_gib(device)
        per_sample = flops.train + (0 if features is not None else flops.vision)
        record(
            out,
            {
                **common,
                "phase": "train",
                "batch_size": batch,
                "checkpointed_layers": plan.checkpointed_layers if plan else 0,
                "samples_per_s": round(rate, 3),
                "tokens_per_s": round(rate * flops.tokens, 1),
                "peak_gib": round(reserved, 2),
                "peak_allocated_gib": round(allocated, 2),
                "mfu": round(rate * per_sample / PEAK_FLOPS, 4),
                "flops_per_sample": per_sample,
                "steps": steps,
                "warmup_steps": bench.warmup,
                "setup_s": round(setup_s, 1),
                "plan_s": round(plan_s, 1),
                "train_call_s": round(total_s, 1),
                "plan": plan.describe() if plan else None,
                "plan_source": warm.plan_source,
                # What the first repeat's process found in --compile-cache: a warm start's evidence.
                "compile_cache": warm.compile_cache,
                "compile_cache_saved": warm.saved,
                **({"repeat": repeat + 1, "repeats": bench.repeats} if bench.repeats > 1 else {}),
                # Mean training loss over each logging window (every --logging-steps steps).
                "losses": [
                    [entry["step"], round(entry["loss"], 4)]
                    for entry in trainer.state.log_history
                    if "loss" in entry
                ],
                **({"feature_images_per_s": round(feature_rate, 2)} if feature_rate else {}),
            },
        )
        if profiled:
            # After the row: the timed steps' number must not depend on the profile's analysis.
            write_profile(*profiled, bench, device, out / f"profile-{common['arch']}-{name}.txt")
        # The next repeat's trainer must not find this one's optimizer state still on the GPU.
        del trainer
        gc.collect()
    del model, features
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._dynamo.reset()


def profile_steps(trainer, bench: argparse.Namespace, device: str, steps: int):
    """Train through the timed steps, then profile `bench.profile` more steps (after one untimed step that
    starts the tracer, and in which the calls that wait for the GPU are recorded)."""
    from transformers import TrainerCallback

    timed = bench.warmup + steps
    trainer.args.max_steps = timed + 1 + bench.profile
    activities = profiler_activities(device)
    schedule = torch.profiler.schedule(wait=timed, warmup=1, active=bench.profile, repeat=1)
    waits = SynchronizingCalls()

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == timed and device == "cuda":
                waits.start()

        def on_step_end(self, args, state, control, **kwargs):
            waits.stop()
            profiler.step()

    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        trainer.add_callback(Step())
        trainer.train()
    return profiler, waits


def profiler_activities(device: str) -> list:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def profile_sections(profiler, device: str, steps: int) -> tuple[float, str, str, str]:
    """Of a finished profile over `steps` steps: GPU-busy milliseconds per step, kernel time per step by
    kind, the longest GPU idle gaps, and the operator table."""
    busy_ms, gaps = gpu_idle(profiler.events())
    kinds = describe_kinds(gpu_time_by_kind(profiler.events()), steps)
    idle = "\n".join(f"{gap:8.2f} ms after {before[:60]}, before {after[:60]}" for gap, before, after in gaps)
    table = profiler.key_averages().table(
        sort_by="self_device_time_total" if device == "cuda" else "self_cpu_time_total",
        row_limit=40,
        max_name_column_width=60,
    )
    return busy_ms / steps, kinds, idle, table


def profile_eval(path: Path, device: str, run) -> None:
    """One more evaluation pass under the profiler: its kernel time by kind and the operator table."""
    with torch.profiler.profile(activities=profiler_activities(device)) as profiler:
        run()
        sync(device)
    ranges = [event.time_range for event in profiler.events()]
    wall_ms = (max(r.end for r in ranges) - min(r.start for r in ranges)) / 1000
    busy_ms, kinds, idle, table = profile_sections(profiler, device, 1)
    summary = f"evaluation pass: about {wall_ms:.1f} ms wall, GPU busy {busy_ms:.1f} ms"
    path.write_text(
        f"{summary}\n\nkernel time by kind:\n{kinds}\n\nlongest GPU idle gaps:\n{idle}\n\n{table}\n"
    )
    print(f"PROFILE {path.name}: {summary}", flush=True)


def host_profile_steps(trainer, bench: argparse.Namespace, steps: int, path: Path) -> None:
    """Train through the timed steps, then `bench.host_profile` more steps under yappi (CPU time of every
    Python thread, the autograd engine's too): which Python functions keep the host busy."""
    import yappi
    from transformers import TrainerCallback

    timed = bench.warmup + steps
    trainer.args.max_steps = timed + bench.host_profile

    class Step(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == timed:
                yappi.set_clock_type("cpu")
                yappi.start(profile_threads=True)

    trainer.add_callback(Step())
    trainer.train()
    yappi.stop()
    functions = yappi.get_func_stats()
    threads = yappi.get_thread_stats()
    lines = [f"host CPU time over {bench.host_profile} steps, by thread:"]
    lines += [f"{thread.ttot:9.3f} s  {thread.name} ({thread.id})" for thread in threads]
    for key, title in (("tsub", "own time"), ("ttot", "time including callees")):
        functions.sort(key, "desc")
        lines += ["", f"functions by {title} (s, calls):"]
        lines += [
            f"{stat.tsub:8.3f} {stat.ttot:8.3f} {stat.ncall:8d}  {stat.full_name[-150:]}"
            for stat in functions[:45]
        ]
    yappi.clear_stats()
    path.write_text("\n".join(lines) + "\n")
    print(f"HOST-PROFILE {path.name}", flush=True)


def write_profile(profiler, waits, bench: argparse.Namespace, device: str, path: Path) -> None:
    """Where the profiled steps' time went: per step, wall time against the time the GPU was busy (the gap
    is the host's: launches, Python, synchronizations), the longest gaps, the calls that made the untimed
    step wait for the GPU, and the operators by GPU time."""
    events = profiler.key_averages()
    steps = [event for event in events if event.key.startswith("ProfilerStep")]
    wall_ms = sum(event.cpu_time_total for event in steps) / 1000 / bench.profile
    busy_ms, kinds, idle, table = profile_sections(profiler, device, bench.profile)
    summary = f"per step: {wall_ms:.1f} ms wall, GPU busy {busy_ms:.1f} ms ({busy_ms / wall_ms:.0%})"
    path.write_text(
        f"{summary}\n\nkernel time per step by kind:\n{kinds}\n\nlongest GPU idle gaps:\n{idle}\n\n"
        "calls that waited for the GPU in one untimed step (torch.cuda.set_sync_debug_mode), innermost\n"
        "frame first:\n"
        f"{waits.report()}\n\n{table}\n"
    )
    print(f"PROFILE {path.name}: {summary}", flush=True)


class SynchronizingCalls:
    """The Python call sites of everything that waits for the GPU, recorded by CUDA's sync debug mode."""

    def __init__(self) -> None:
        self.sites: collections.Counter[str] = collections.Counter()
        self.context: warnings.catch_warnings | None = None

    def start(self) -> None:
        self.context = warnings.catch_warnings()
        self.context.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self.record
        torch.cuda.set_sync_debug_mode("warn")

    def record(self, message, category, filename, lineno, file=None, line=None) -> None:
        if not str(message).startswith("called a synchronizing"):  # not the mode's prototype notice
            return
        frames = [
            frame
            for frame in traceback.extract_stack()[:-1]
            if "/torch/" not in frame.filename and "/warnings.py" not in frame.filename
        ]
        where = " <- ".join(
            f"{Path(frame.filename).name}:{frame.lineno} {frame.name}" for frame in frames[-5:][::-1]
        )
        self.sites[where] += 1

    def stop(self) -> None:
        if self.context is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.context.__exit__(None, None, None)
            self.context = None

    def report(self) -> str:
        return "\n".join(f"{count:4d} x {site}" for site, count in self.sites.most_common()) or "   none"


def gpu_idle(events) -> tuple[float, list[tuple[float, str, str]]]:
    """Milliseconds the GPU ran kernels (overlaps merged) over the profiled steps, and the 15 longest gaps
    between kernels, with the kernels on either side: where the GPU waited for the host."""
    kernels = sorted(
        (event.time_range.start, event.time_range.end, event.name)
        for event in events
        if event.device_type == torch.autograd.DeviceType.CUDA
        # Spans such as ProfilerStep#N are annotations covering whole steps, not kernels.
        and not getattr(event, "is_user_annotation", False)
        and not event.name.startswith("ProfilerStep")
    )
    if not kernels:
        return 0.0, []
    busy_us, gaps = 0.0, []
    start, end, name = kernels[0]
    for next_start, next_end, next_name in kernels[1:]:
        if next_start > end:
            busy_us += end - start
            gaps.append(((next_start - end) / 1000, name, next_name))
            start = next_start
        if next_end >= end:
            end, name = next_end, next_name
    busy_us += end - start
    return busy_us / 1000, sorted(gaps, reverse=True)[:15]


# Where a profiled step's GPU time went, by what launched each kernel (the innermost op of these names above
# its launch) or, for the compiler's own kernels, by what their names say they fuse.
KERNEL_KINDS = (
    ("fp8 matmul", lambda kernel, ops: "aten::_scaled_mm" in ops),
    ("bf16 matmul", lambda kernel, ops: bool(ops & {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear"})),
    ("attention", lambda kernel, ops: "attention" in kernel or "sdpa" in kernel or "flash" in kernel
        or any("attention" in op for op in ops)),
    ("LoRA dropout mask, fused", lambda kernel, ops: kernel.startswith("triton") and "rshift" in kernel),
    ("fp8 quantization, fused", lambda kernel, ops: kernel.startswith("triton") and "amax" in kernel),
    ("other compiled kernels", lambda kernel, ops: kernel.startswith("triton")),
    ("optimizer", lambda kernel, ops: "multi_tensor" in kernel
        or any("_foreach" in op or "optimizer" in op.lower() for op in ops)),
    ("copies", lambda kernel, ops: kernel.startswith("Memcpy") or kernel.startswith("Memset")),
    ("other", lambda kernel, ops: True),
)  # fmt: skip


def gpu_time_by_kind(events) -> dict[str, float]:
    """Milliseconds of kernel time per KERNEL_KINDS entry, summed over the events' kernels."""
    totals = dict.fromkeys((kind for kind, _ in KERNEL_KINDS), 0.0)
    for event in events:
        kernels = getattr(event, "kernels", None)
        if event.device_type != torch.autograd.DeviceType.CPU or not kernels:
            continue
        ops, parent = set(), event
        while parent is not None:
            ops.add(parent.name)
            parent = parent.cpu_parent
        for kernel in kernels:
            kind = next(kind for kind, matches in KERNEL_KINDS if matches(kernel.name, ops))
            totals[kind] += kernel.duration / 1000
    return totals


def describe_kinds(totals: dict[str, float], steps: int) -> str:
    whole = sum(totals.values()) or 1.0
    return "\n".join(f"{ms / steps:9.1f} ms {ms / whole:6.1%}  {kind}" for kind, ms in totals.items() if ms)


def build_tiny(processor):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        **tiny_config(processor),
        image_token_index=ids("<image_soft_token>"),
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, ids("<end_of_turn>")],
        bos_token_id=tokenizer.bos_token_id,
    )
    model = Gemma3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, ids("<end_of_turn>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.requires_grad_(False)


def quality(out: Path, extra: list[str], configs: list[str]) -> None:
    """The tiny model on synthetic pets, trained with every lever on, with int8 weights, and with all levers
    off: accuracies."""
    from trainer.offline.synthetic import write_dataset
    from trainer.offline.tiny import build

    root = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    build(root / "model")
    write_dataset(root / "pets", per_class=20, test_per_class=6)
    base = [
        sys.executable, "-m", "trainer", "--model-id", str(root / "model"), "--dataset", str(root / "pets"),
        "--train-size", "740", "--eval-size", "222", "--num-epochs", "5", "--learning-rate", "2e-2",
        "--batch-size", "16", "--eval-batch-size", "32", "--checkpoint-strategy", "no",
        "--logging-steps", "50", "--eval-method", "both", "--seed", "0", *extra,
    ]  # fmt: skip
    off = ["--compile", "off", "--no-cache-image-features", "--gradient-checkpointing", "off"]
    for name, flags in (("levers-on", []), ("int8", ["--quantization", "int8"]), ("levers-off", off)):
        if name not in configs:
            continue
        run_dir = root / name
        start = time.perf_counter()
        result = subprocess.run(
            [*base, "--output-dir", str(run_dir), *flags],
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
        )
        (out / f"quality-{name}.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            print(f"QUALITY {name} failed:\n{result.stderr[-3000:]}", flush=True)
            continue
        results = json.loads((run_dir / "results.json").read_text())
        row = {
            "config": name,
            "seconds": round(time.perf_counter() - start, 1),
            "by_method": results["by_method"],
            "train_samples_per_s": results["train"]["samples_per_s"],
        }
        print("QUALITY " + json.dumps(row), flush=True)
        with (out / "quality.jsonl").open("a") as file:
            file.write(json.dumps(row) + "\n")


def warm_start_flags(bench: argparse.Namespace) -> list[str]:
    """The trainer's warm start in --compile-cache DIR (its --output-dir holds nothing else here), or none."""
    if bench.compile_cache is None:
        return ["--no-compile-cache"]
    return ["--compile-cache", "--output-dir", str(bench.compile_cache)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["4b", "27b"], default="4b")
    parser.add_argument("--configs", default="reference,ours", help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--phases", default="train,eval")
    parser.add_argument("--max-memory-gib", type=float, default=85.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument(
        "--logging-steps",
        type=int,
        default=1000,
        help="log the mean loss every this many steps (into each row's losses); each log waits for the GPU",
    )
    parser.add_argument(
        "--eval-passes",
        type=int,
        default=1,
        help="time this many passes over the --eval-samples images (one loader): more batches, same images",
    )
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time training this many times on one model: each a fresh trainer from the initial adapters, "
        "with the first one's plan; one row each",
    )
    parser.add_argument(
        "--repeat-steps",
        type=int,
        metavar="N",
        help="timed steps of each repeat after the first (default: --steps): the first gives the loss curve",
    )
    parser.add_argument(
        "--out", type=Path, help="where gpu.jsonl is appended (default: bench/results; --smoke: a temp dir)"
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the timed training steps (of the last repeat), profile this many more: "
        "OUT/profile-ARCH-CONFIG.txt; and one more evaluation pass: OUT/profile-ARCH-CONFIG-eval.txt",
    )
    parser.add_argument(
        "--host-profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="after the timed training steps (of the last repeat), this many more under yappi (every Python "
        "thread's CPU time; pip install yappi): OUT/host-profile-ARCH-CONFIG.txt",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE",
        help="a torch.compile setting to try (bench/torch_settings.py), recorded in each row",
    )
    parser.add_argument(
        "--flags",
        default="",
        help="trainer flags added after each configuration's own (they win), recorded in each row: "
        '--flags="--batch-size 9"',
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        metavar="DIR",
        help="the trainer's warm start (--compile-cache) in DIR: compiled graphs and the memory plan of an "
        "earlier bench process with the same DIR are reused, and this one's stored; rows record setup_s, "
        "plan_s, compile_cache and plan_source. Default: no warm start",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, 2 steps: the code paths only")
    parser.add_argument("--quality", action="store_true", help="tiny model, levers on vs off: accuracy")
    parser.add_argument("--quality-flags", default="", help="extra trainer flags for --quality")
    parser.add_argument("--quality-configs", default="levers-on,int8,levers-off")
    bench = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    # A CPU smoke run must never add rows to the measured GPU results.
    bench.out = bench.out or (
        Path(tempfile.mkdtemp(prefix="gpu-smoke-")) if bench.smoke else Path("bench/results")
    )
    bench.out.mkdir(parents=True, exist_ok=True)
    torch_settings.apply(bench.set)
    device = "cuda" if torch.cuda.is_available() and not bench.smoke else "cpu"
    print("VERSIONS " + json.dumps({**versions(), "gpu": gpu_name(device)}), flush=True)
    if bench.quality:
        quality(bench.out, bench.quality_flags.split(), bench.quality_configs.split(","))
        return
    if bench.smoke:
        bench.warmup, bench.steps, bench.eval_samples, bench.train_per_class = 1, 2, 4, 1
    test_per_class = max(1, math.ceil(bench.eval_samples / len(BREEDS)))
    bench.train_size = len(BREEDS) * bench.train_per_class
    bench.eval_size = len(BREEDS) * test_per_class
    image_size, tokens = (32, 4) if bench.smoke else (896, 256)
    processor = build_processor(image_size, tokens)
    dataset = Path(tempfile.mkdtemp(prefix="bench-pets-"))
    start = time.perf_counter()
    write_images(dataset, bench.train_per_class, test_per_class, 96 if bench.smoke else 896)
    log.info("images written in %.1f s", time.perf_counter() - start)
    global PROMPT_TOKENS
    if bench.smoke:
        PROMPT_TOKENS = 60
    names = [readable_name(breed) for breed in BREEDS]
    bench.question = pad_prompt(processor, names, PROMPT_TOKENS)
    log.info("prompt: %d tokens", PROMPT_TOKENS)
    data = load_pets(str(dataset), bench.train_size, bench.eval_size, seed=42)
    random.seed(0)
    for name in bench.configs.split(","):
        try:
            measure(name, bench.arch, bench.phases.split(","), bench, dataset, data, processor, bench.out)
        except UserError as refused:  # a configuration this machine cannot run, e.g. 4-bit without CUDA
            print(f"SKIPPED {name}: {refused}", flush=True)
        except Exception:  # one configuration's failure must not cost the others' numbers
            print(f"FAILED {name}:\n{traceback.format_exc()}", flush=True)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
