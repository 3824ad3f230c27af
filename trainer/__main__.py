"""python -m trainer: fine-tune Gemma 3 on Oxford-IIIT Pet and evaluate it before and after.

Flags keep the reference script's names. Outputs go to --output-dir, or to --output-dir/$CLOUD_RUN_EXECUTION
inside a Cloud Run job, so a retried task resumes from its own checkpoints (docs/trainer.md).
"""

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import datasets
import huggingface_hub
import torch
import transformers
from peft import PeftModel
from transformers import ProcessorMixin, set_seed
from trl import SFTTrainer

from trainer import UserError
from trainer.container import (
    SharedMemory,
    check_writable,
    compile_toolchain_problem,
    describe_platform,
    pixel_bytes,
)
from trainer.data import ChatFormat, PetData, chat_format, load_pets
from trainer.evaluate import per_class_metrics, predict, save_confusion_matrix, summary_metrics
from trainer.export import merge, run_settings, upload, versions, write_results
from trainer.modeling import (
    check_model_id,
    choose_precision,
    load_model,
    load_processor,
    resolve_device,
)
from trainer.speed import (
    GIB,
    ImageFeatures,
    Plan,
    apply_memory_budget,
    compile_layers,
    decoder_layers,
    loader_workers,
    plan_memory,
    set_checkpointed_layers,
)
from trainer.train import (
    AnswerOnlyCollator,
    RunState,
    Stopped,
    make_trainer,
    probe_step,
    set_batch_size,
    sft_config,
    train,
)

log = logging.getLogger("trainer")

# --batch-size auto without a GPU to measure: the batch the tiny model's CPU runs were tuned with.
CPU_BATCH_SIZE = 8


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: it is what the job's log and the launcher show.
        print(f"Error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def dropout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def batch_size(text: str) -> int | None:
    """None for auto."""
    return None if text == "auto" else positive_int(text)


def gcs_path(text: str) -> str:
    if not text.startswith("gs://") or not text.removeprefix("gs://").split("/")[0]:
        raise argparse.ArgumentTypeError(f"must look like gs://BUCKET[/PREFIX], got {text!r}")
    return text.rstrip("/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="python -m trainer", description=__doc__.splitlines()[0])
    p.add_argument("--model-id", default="google/gemma-3-4b-it", help="Hub id or local model directory")
    p.add_argument(
        "--dataset",
        default="timm/oxford-iiit-pet",
        help="Hub id, datasets.save_to_disk directory, or a directory in the official Oxford-IIIT Pet layout",
    )
    p.add_argument("--train-size", type=positive_int, default=3680, help="images drawn from trainval")
    p.add_argument("--eval-size", type=positive_int, default=1000, help="images drawn from test")
    p.add_argument("--num-epochs", type=positive_float, default=1.0)
    p.add_argument("--learning-rate", type=positive_float, default=2e-4)
    p.add_argument(
        "--batch-size",
        type=batch_size,
        default="auto",
        help="per-device training batch; auto (GPU): the fastest that fits --max-memory-gib, measured with "
        "probe steps (at most 32); auto on CPU: 8",
    )
    p.add_argument("--gradient-accumulation-steps", type=positive_int, default=1)
    p.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=16,
        help="images per evaluation batch; scoring runs the 37 answers of each image in the same sequence",
    )
    p.add_argument("--lora-r", type=positive_int, default=16)
    p.add_argument("--lora-alpha", type=positive_int, default=32)
    p.add_argument(
        "--lora-dropout",
        type=dropout,
        default=0.05,
        help="dropout on the adapters' inputs, applied inside each adapter with a mask hashed from a seed, "
        "which the backward pass computes again: no masks or dropped copies are kept (a quarter of 27B's "
        "activation memory, docs/benchmarks.md); 0: none",
    )
    p.add_argument("--output-dir", default="output")
    p.add_argument("--gcs-output-path", type=gcs_path, help="gs://BUCKET/PREFIX to upload the outputs to")
    p.add_argument("--merge", action="store_true", help="also write the adapter merged into the base model")
    p.add_argument("--checkpoint-strategy", choices=["steps", "epoch", "no"], default="steps")
    p.add_argument("--save-steps", type=positive_int, default=100)
    p.add_argument("--save-total-limit", type=positive_int, default=2)
    p.add_argument("--logging-steps", type=positive_int, default=10)
    p.add_argument("--hf-token", default=None, help="default: $HF_TOKEN")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument(
        "--quantization",
        choices=["auto", "fp8", "int8", "4bit", "none"],
        default="auto",
        help="base weights: none = bf16; fp8 = e4m3 storage and FP8 matmuls (GPUs with FP8 tensor cores); "
        "int8 = int8 storage, bf16 compute; 4bit = NF4 (QLoRA). auto: fp8 on Hopper GPUs (H100, H200: "
        "measured faster at 4B and 27B), elsewhere the most precise that leaves half of --max-memory-gib "
        "for activations (4B: bf16, 27B in 85 GiB: int8); CPU runs fp32 (int8 and fp8 also work there)",
    )
    p.add_argument("--eval-method", choices=["score", "generate", "both"], default="score")
    speed = p.add_argument_group(
        "GPU speed levers",
        "Defaults are the fastest configuration measured on real-size Gemma 3 (docs/benchmarks.md). They "
        "change no result beyond rounding, except that --batch-size auto picks the batch. On CPU, compile "
        "and the memory plan are off.",
    )
    speed.add_argument(
        "--max-memory-gib",
        type=positive_float,
        default=85.0,
        help="GPU memory budget: the process is capped at it (or the GPU's size) and the batch / gradient "
        "checkpointing plan fits it; 85 fits a 96 GB RTX PRO 6000 with room to spare",
    )
    speed.add_argument(
        "--gradient-checkpointing",
        nargs="?",
        const="on",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto: recompute only as many decoder layers as the memory budget demands (a checkpointed layer "
        "runs its forward twice); on (or the bare flag): every layer; off: none",
    )
    speed.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile each decoder layer (fused norms, GeGLU, RoPE, LoRA), static shapes; compiling "
        "and the memory probes take about a minute at the start (27B on an H200); auto: on for CUDA",
    )
    speed.add_argument(
        "--cache-image-features",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the frozen vision tower once per image before training and reuse its output in every "
        "epoch and both evaluations (host memory: 256 x hidden bf16 values per image, 2.6 MiB at 27B)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dry-run", action="store_true", help="load and format the data, then exit")
    return p.parse_args(argv)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    if not sys.stdout.isatty():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


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
        count = sum(
            features.fill(model, processor, split, args.eval_batch_size, workers)
            for split in (data.train, data.test)
        )
        log.info("image features of %d images in %.1f s", count, time.perf_counter() - start)
    if args.compile == "on" or (args.compile == "auto" and device == "cuda"):
        compile_layers(model)
    return features


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
) -> tuple[SFTTrainer, Plan]:
    """SFTTrainer with the batch and gradient checkpointing of the memory plan (measured on GPU), or of an
    earlier attempt of the task (`state`)."""
    state = state or RunState(run_dir, attempt=0)
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
    layers = len(decoder_layers(model))
    if state.get("plan"):
        plan = Plan(**state.get("plan"))
        log.info(
            "batch %d, gradient checkpointing on %d layers: the plan of an earlier attempt",
            plan.batch_size,
            plan.checkpointed_layers,
        )
        set_checkpointed_layers(model, plan.checkpointed_layers)
    elif device == "cuda" and not (args.batch_size and args.gradient_checkpointing != "auto"):
        examples = [data.train[index] for index in range(min(2, len(data.train)))]
        budget = int(args.max_memory_gib * GIB)
        plan = plan_memory(
            model, probe_step(trainer), examples, budget, args.batch_size, args.gradient_checkpointing
        )
    else:
        plan = Plan(first_batch, layers if args.gradient_checkpointing == "on" else 0)
        set_checkpointed_layers(model, plan.checkpointed_layers)
    set_batch_size(trainer, plan.batch_size)
    state.save("plan", dataclasses.asdict(plan))
    if workers:
        shm = shm or SharedMemory.measure()
        batch_bytes = plan.batch_size * pixel_bytes(processor)
        trainer.args.dataloader_num_workers = shm.workers(workers, batch_bytes, "training batches")
    return trainer, plan


def eval_workers(args: argparse.Namespace, processor: ProcessorMixin, device: str, shm: SharedMemory) -> int:
    """Data-loader workers for batches of --eval-batch-size images (features, evaluation) fitting /dev/shm."""
    batch_bytes = args.eval_batch_size * pixel_bytes(processor)
    return shm.workers(loader_workers(device), batch_bytes, "evaluation batches")


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


def run(args: argparse.Namespace) -> None:
    log.info("%s", describe_platform())
    token = args.hf_token or os.environ.get("HF_TOKEN") or None
    execution = os.environ.get("CLOUD_RUN_EXECUTION")
    attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0"))
    output_dir = Path(args.output_dir)
    run_dir = output_dir / execution if execution else output_dir

    check_model_id(args.model_id)
    # The adapter records the base model's path: keep it valid from any working directory.
    model_id = str(Path(args.model_id).resolve()) if Path(args.model_id).is_dir() else args.model_id
    device = resolve_device(args.device)
    if not args.dry_run:  # a dry run writes nothing
        check_writable(run_dir)
        check_compile(args, device)
        shm = SharedMemory.measure()
    precision = choose_precision(args.quantization, device, model_id, token, args.max_memory_gib)
    data = load_pets(args.dataset, args.train_size, args.eval_size, args.seed, token)
    log.info(
        "data: %d train / %d eval images, %d breeds", len(data.train), len(data.test), len(data.class_names)
    )
    processor = load_processor(model_id, token)
    chat = chat_format(processor, data.class_names)

    if args.dry_run:
        batch = AnswerOnlyCollator(processor, chat)([data.train[0]])
        answer = batch["input_ids"][0][batch["labels"][0] != -100]
        log.info("prompt: %r", chat.prompt)
        log.info("answer (the only labelled tokens): %r", processor.tokenizer.decode(answer))
        log.info("batch: %s", {name: tuple(tensor.shape) for name, tensor in batch.items()})
        log.info("dry run: data formatted, no weights loaded")
        return

    set_seed(args.seed)
    start = time.perf_counter()
    model = load_model(model_id, precision, device, token, args.lora_r, args.lora_alpha, args.lora_dropout)
    # What each task attempt pays before its first step (docs/benchmarks.md): load, features, compile, plan.
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    workers = eval_workers(args, processor, device, shm)
    features = speed_up(args, model, processor, data, device, workers)
    methods = ["score", "generate"] if args.eval_method == "both" else [args.eval_method]
    labels = data.test["label"]

    def evaluate_all() -> dict[str, list[int]]:
        return {
            method: predict(
                method,
                model,
                processor,
                chat,
                data.test,
                data.class_names,
                args.eval_batch_size,
                features,
                workers,
            )
            for method in methods
        }

    state = RunState(run_dir, attempt)
    baseline = state.get("baseline")
    if baseline is None:
        start = time.perf_counter()
        baseline = evaluate_all()
        log.info("baseline evaluation of %d images in %.1f s", len(data.test), time.perf_counter() - start)
        state.save("baseline", baseline)
    else:
        log.info("task attempt %d: baseline predictions of an earlier attempt", attempt)
    trainer, _ = build_trainer(args, model, processor, data, chat, device, run_dir, features, state, shm)
    output = train(trainer, run_dir, attempt)
    final = evaluate_all()

    trainer.save_model(str(run_dir))  # adapter (PEFT format) + processor
    (run_dir / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    primary = methods[0]
    save_confusion_matrix(labels, final[primary], data.class_names, run_dir / "confusion_matrix.png")
    by_method = {
        method: {
            "baseline": summary_metrics(labels, baseline[method]),
            "final": summary_metrics(labels, final[method]),
        }
        for method in methods
    }
    results = {
        "model_id": args.model_id,
        "dataset": args.dataset,
        "train_size": len(data.train),
        "eval_size": len(data.test),
        "eval_method": args.eval_method,
        "baseline": by_method[primary]["baseline"],
        "final": by_method[primary]["final"],
        "by_method": by_method,
        "per_class": per_class_metrics(labels, final[primary], data.class_names),
        "train": {
            "steps": output.global_step,
            "runtime_s": output.metrics["train_runtime"],
            "samples_per_s": output.metrics["train_samples_per_second"],
        },
        "versions": versions(),
        "execution": execution,
        "task_attempt": attempt,
        "settings": run_settings(
            args,
            device=device,
            weights=precision,
            batch_size=trainer.args.per_device_train_batch_size,
            effective_batch_size=trainer.args.per_device_train_batch_size * args.gradient_accumulation_steps,
        ),
    }
    write_results(run_dir / "results.json", results)
    if args.merge:
        merge(model_id, run_dir, run_dir / "merged", device, token)

    log.info("%-24s %9s %9s", "metric", "baseline", "final")
    for method, phases in by_method.items():
        for metric in phases["final"]:
            log.info(
                "%-24s %9.4f %9.4f", f"{method} {metric}", phases["baseline"][metric], phases["final"][metric]
            )

    if execution:
        (output_dir / "LATEST").write_text(execution + "\n")
    if args.gcs_output_path:
        files = [path.relative_to(output_dir) for path in sorted(run_dir.rglob("*")) if path.is_file()]
        upload(output_dir, files + ([Path("LATEST")] if execution else []), args.gcs_output_path)
    log.info("done: outputs in %s", run_dir)


def out_of_memory(args: argparse.Namespace, error: torch.OutOfMemoryError) -> str:
    """The flags that decide how much GPU memory a run needs, with this run's values."""
    # PyTorch's first two sentences ("CUDA out of memory. Tried to allocate 2.00 GiB"), not its statistics.
    cause = ". ".join(str(error).split(". ")[:2])
    batch = args.batch_size or "auto"
    return (
        f"the GPU ran out of memory ({cause}) within --max-memory-gib {args.max_memory_gib:g}. It needs less "
        f"with a smaller --batch-size (now {batch}), --gradient-checkpointing on (now "
        f"{args.gradient_checkpointing}), a smaller --eval-batch-size (now {args.eval_batch_size}), or "
        f"--quantization int8 or 4bit (now {args.quantization})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        run(args)
    except UserError as error:
        print(f"Error: {error}", file=sys.stderr, flush=True)
        if error.hint:
            print(f"Hint: {error.hint}", file=sys.stderr, flush=True)
        return 2
    except Stopped as stopped:
        log.warning("%s", stopped)
        # Not 0: Cloud Run must count the attempt as failed to start the next one.
        return 128 + signal.SIGTERM
    except torch.OutOfMemoryError as error:
        print(f"Error: {out_of_memory(args, error)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
