"""python -m trainer: fine-tune Gemma 3 on Oxford-IIIT Pet and evaluate it before and after.

The story, top to bottom: run() checks the container, loads the data and the processor, then fine_tune()
loads the model, evaluates the baseline, trains, evaluates again and saves; run() merges, prints the
metrics and uploads; main() turns errors into exit codes. The speed levers come in through trainer.speed.

Flags keep the reference script's names (trainer/flags.py). Outputs go to --output-dir, or to
--output-dir/$CLOUD_RUN_EXECUTION inside a Cloud Run job (a sweep's task: its task-<index>/ below that,
trainer/sweep.py), so a retried task resumes from its own checkpoints, and an error that a retry cannot
fix is recorded there for the later attempts (trainer/failure.py; docs/trainer.md).
"""

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import datasets
import huggingface_hub
import torch
import transformers
from transformers import ProcessorMixin, set_seed

from trainer import UserError, failure, flags, report_page, run_record, sweep
from trainer.container import SharedMemory, check_writable, describe_platform
from trainer.data import ChatFormat, PetData, chat_format, load_pets
from trainer.evaluate import per_class_metrics, predict_ranked, save_confusion_matrix, summary_metrics
from trainer.export import merge, run_settings, upload, versions, write_results
from trainer.flags import FlagError, parse_args
from trainer.modeling import check_model_id, load_processor, resolve_device
from trainer.speed import (
    build_trainer,
    check_compile,
    choose_precision,
    eval_workers,
    load_model,
    memory_budget,
    open_warm_start,
    planned_batch,
    speed_up,
)
from trainer.speed.out_of_memory import (
    BASELINE,
    FINAL,
    IMAGE_FEATURES,
    LOADING,
    MEMORY_PLAN,
    MERGING,
    TRAINING,
    describe,
    gpu_pass,
)
from trainer.speed.warm_start import CACHE
from trainer.train import AnswerOnlyCollator, RunState, Stopped, train

log = logging.getLogger("trainer")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    transformers.utils.logging.set_verbosity_warning()
    # PEFT 0.21 (get_peft_model) and TRL 1.16 (generation) still read transformers 5's deprecated alias
    # `is_gradient_checkpointing`: their warning names nothing a user of the trainer can change.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )
    if not sys.stdout.isatty():
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def run_directory(output: str, execution: str | None, task: int | None = None) -> Path:
    """Where a run writes: --output-dir, or its subdirectory named for the Cloud Run execution; a sweep's
    task in task-<index>/ below that, so that each task resumes its own checkpoints."""
    run_dir = Path(output) / execution if execution else Path(output)
    return run_dir if task is None else run_dir / f"task-{task}"


def fine_tune(
    args: argparse.Namespace,
    model_id: str,
    precision: str,
    device: str,
    token: str | None,
    data: PetData,
    processor: ProcessorMixin,
    chat: ChatFormat,
    run_dir: Path,
    execution: str | None,
    attempt: int,
    where: dict[str, str | None],
    shm: SharedMemory,
) -> dict[str, dict[str, dict[str, float]]]:
    """Load, evaluate, train, evaluate again; write the adapter and results.json into run_dir. `where`:
    when the attempt started and in which region (run_record.attempt_record), recorded in results.json.

    Returns each evaluation method's baseline and final metrics. The model, the trainer and its optimizer
    state and the image features live only in here, so that nothing references them once it returns.
    """
    clock = run_record.PhaseClock()
    start = time.perf_counter()
    with gpu_pass(LOADING), clock.phase("load_s"):
        model = load_model(
            model_id, precision, device, token, args.lora_r, args.lora_alpha, args.lora_dropout
        )
    # What each task attempt pays before its first step (docs/benchmarks.md): load, features, compile, plan.
    log.info("model loaded in %.1f s", time.perf_counter() - start)
    warm = open_warm_start(args, model, precision, device)
    workers = eval_workers(args, processor, device, shm)
    with gpu_pass(IMAGE_FEATURES), clock.phase("image_features_s"):
        features = speed_up(args, model, processor, data, device, workers)
    methods = ["score", "generate"] if args.eval_method == "both" else [args.eval_method]
    labels = data.test["label"]

    def evaluate_all() -> tuple[dict[str, list[int]], list | None]:
        """Each method's predictions, and the first method's top-5 per image (None for generation)."""
        predictions, ranked = {}, None
        for method in methods:
            batch = args.eval_batch_size
            if device == "cuda":
                budget = memory_budget(args.max_memory_gib, device)
                batch = planned_batch(
                    method, model, processor, chat, data.test, data.class_names, batch, features, budget
                )
            predictions[method], top = predict_ranked(
                method, model, processor, chat, data.test, data.class_names, batch, features, workers
            )
            ranked = top if method == methods[0] else ranked
        return predictions, ranked

    state = RunState(run_dir, attempt)
    baseline, baseline_top = state.get("baseline"), state.get("baseline_top5")
    if baseline is None:
        start = time.perf_counter()
        with gpu_pass(BASELINE), clock.phase("baseline_s"):
            baseline, baseline_top = evaluate_all()
        log.info("baseline evaluation of %d images in %.1f s", len(data.test), time.perf_counter() - start)
        state.save("baseline_top5", baseline_top)
        state.save("baseline", baseline)
    else:
        log.info("task attempt %d: baseline predictions of an earlier attempt", attempt)
    with gpu_pass(MEMORY_PLAN), clock.phase("memory_plan_s"):
        trainer, _ = build_trainer(
            args, model, processor, data, chat, device, run_dir, features, state, shm, warm
        )
    trainer.add_callback(warm.callback())
    with gpu_pass(TRAINING), clock.phase("train_s"):
        try:
            output = train(trainer, run_dir, attempt)
        except torch.OutOfMemoryError:
            # A stored plan that ran out of memory must not be every later execution's plan.
            warm.drop_plans()
            raise
    with gpu_pass(FINAL), clock.phase("final_eval_s"):
        final, final_top = evaluate_all()
    warm.save_artifacts()  # only when the final evaluation compiled graphs the file lacks

    primary = methods[0]
    with clock.phase("save_s"):
        trainer.save_model(str(run_dir))  # adapter (PEFT format) + processor
        (run_dir / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
        save_confusion_matrix(labels, final[primary], data.class_names, run_dir / "confusion_matrix.png")
        paths = run_record.image_paths(data.test, args.dataset)
        predictions = run_record.predictions_document(
            paths,
            labels,
            data.class_names,
            primary,
            (baseline[primary], baseline_top),
            (final[primary], final_top),
        )
        curve = run_record.training_curve(trainer.state.log_history)
        thumbnails = run_record.thumbnails(data.test, predictions)
        run_record.write(run_dir, "predictions.json", predictions)
        run_record.write(run_dir, "training_curve.json", curve)
        run_record.write(run_dir, "thumbnails.json", thumbnails)
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
        "platform": describe_platform(),
        "phases": clock.rounded(),
        "warm_start": warm.record(),
        "execution": execution,
        "task_attempt": attempt,
        **where,
        "settings": run_settings(
            args,
            device=device,
            weights=precision,
            batch_size=trainer.args.per_device_train_batch_size,
            effective_batch_size=trainer.args.per_device_train_batch_size * args.gradient_accumulation_steps,
        ),
    }
    write_results(run_dir / "results.json", results)
    page = report_page.run_page(results, predictions, curve, thumbnails)
    (run_dir / "report.html").write_text(report_page.render([page]))
    return by_method


def run(args: argparse.Namespace, task: int | None = None) -> None:
    """`task`: the index of a sweep's task, whose combination `args` already holds."""
    log.info("%s", describe_platform())
    token = args.hf_token or os.environ.get("HF_TOKEN") or None
    execution = os.environ.get("CLOUD_RUN_EXECUTION")
    attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0"))
    # For results.json: once the run's record is gone, `gemma-launch` counts its duration from this start.
    where = run_record.attempt_record(run_record.process_started(), run_record.cloud_run_region())
    output_dir = Path(args.output_dir)
    run_dir = run_directory(args.output_dir, execution, task)
    if task is not None:
        log.info("sweep task %d: %s", task, sweep.combinations(args.sweep_grid)[task])

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
    by_method = fine_tune(
        args,
        model_id,
        precision,
        device,
        token,
        data,
        processor,
        chat,
        run_dir,
        execution,
        attempt,
        where,
        shm,
    )
    if args.merge:
        # fine_tune has returned: the quantized model, its optimizer state, the trainer and the image
        # features are unreferenced, and merge frees them before it loads the bf16 weights.
        with gpu_pass(MERGING):
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
        # Not the job's cache (the warm start's), which run_dir holds when it is --output-dir itself.
        files = [
            path.relative_to(output_dir)
            for path in sorted(run_dir.rglob("*"))
            if path.is_file() and not path.relative_to(output_dir).is_relative_to(CACHE)
        ]
        upload(output_dir, files + ([Path("LATEST")] if execution else []), args.gcs_output_path)
    log.info("done: outputs in %s", run_dir)


def main(argv: list[str] | None = None) -> int:
    execution = os.environ.get("CLOUD_RUN_EXECUTION")
    attempt = int(os.environ.get("CLOUD_RUN_TASK_ATTEMPT", "0"))
    try:
        args, task = sweep.for_task(parse_args(argv), sys.argv[1:] if argv is None else argv)
    except FlagError as error:
        failure.report(error)
        output = flags.output_dir(sys.argv[1:] if argv is None else argv)
        if execution and output:
            failure.record(run_directory(output, execution), error, attempt)
        return 2
    setup_logging()
    run_dir = run_directory(args.output_dir, execution, task)
    earlier = failure.recorded(run_dir) if execution and attempt > 0 else None
    if earlier is not None:
        log.info("task attempt %d: an earlier attempt stopped on an error that a retry cannot fix", attempt)
        failure.report(earlier)
        return 2
    try:
        run(args, task)
    except UserError as error:
        failure.report(error)
        if execution and error.recurs:
            failure.record(run_dir, error, attempt)
        return 2
    except Stopped as stopped:
        log.warning("%s", stopped)
        # Not 0: Cloud Run must count the attempt as failed to start the next one.
        return 128 + signal.SIGTERM
    except torch.OutOfMemoryError as error:
        message, hint = describe(args, error)
        # Not recorded for later attempts: the memory another host's GPU leaves free can differ.
        failure.report(UserError(message, hint, recurs=False))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
