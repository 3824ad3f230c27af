"""Supervised fine-tuning with TRL's SFTTrainer: loss on the answer only, resumable across task retries."""

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Container
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PrinterCallback, ProcessorMixin, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput
from trl import SFTConfig, SFTTrainer

from trainer.data import ChatFormat, PetData, PromptEncoder

log = logging.getLogger(__name__)


class AnswerOnlyCollator:
    """Image + question, then the breed name and the end-of-turn marker; labels on those last tokens only."""

    def __init__(self, processor: ProcessorMixin, chat: ChatFormat, features: Container[int] | None = None):
        self.processor = processor
        self.chat = chat
        self.prompts = PromptEncoder(processor, chat, features)

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        # The prompt text is the same for every example, so prompts need no padding: answers are
        # appended after it and right-padded to the longest of all answers, so every batch has one
        # sequence length (compiled layers then need no graph per length; at most 5 padded tokens in 470).
        batch = self.prompts(examples)
        answers = [self.chat.answers[example["label"]] for example in examples]
        width = max(len(answer) for answer in self.chat.answers)
        pad = self.processor.tokenizer.pad_token_id
        answer_ids = torch.tensor([answer + [pad] * (width - len(answer)) for answer in answers])
        answer_mask = torch.tensor([[1] * len(answer) + [0] * (width - len(answer)) for answer in answers])
        prompt_ids = batch["input_ids"]
        batch["input_ids"] = torch.cat([prompt_ids, answer_ids], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], answer_mask], dim=1)
        # token_type_ids mark image tokens, which Gemma 3 attends to bidirectionally.
        batch["token_type_ids"] = torch.cat([batch["token_type_ids"], torch.zeros_like(answer_ids)], dim=1)
        batch["labels"] = torch.cat(
            [torch.full_like(prompt_ids, -100), answer_ids.masked_fill(answer_mask == 0, -100)], dim=1
        )
        return batch


class LogLine(TrainerCallback):
    """One plain line per logging step (Cloud Logging shows one entry per line), and one when training
    ends: each starts "step N/TOTAL", which the launcher reads to show training's progress."""

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.last_time, self.last_step = time.perf_counter(), state.global_step
        self.began = self.last_time

    def on_train_end(self, args, state, control, **kwargs) -> None:
        log.info(
            "step %d/%d: training %s in %.1f s",
            state.global_step,
            state.max_steps,
            "done" if state.global_step >= state.max_steps else "stopped",
            time.perf_counter() - self.began,
        )

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not logs or "loss" not in logs:
            return
        now = time.perf_counter()
        samples = (
            (state.global_step - self.last_step) * args.train_batch_size * args.gradient_accumulation_steps
        )
        rate = samples * args.world_size / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, state.global_step
        log.info(
            "step %d/%d epoch %.2f loss %.4f lr %.3g samples/s %.1f",
            state.global_step,
            state.max_steps,
            logs.get("epoch", 0.0),
            logs["loss"],
            logs.get("learning_rate", 0.0),
            rate,
        )


def sft_config(args, run_dir: Path, device: str, batch_size: int, num_workers: int = 0) -> SFTConfig:
    return SFTConfig(
        output_dir=str(run_dir),
        num_train_epochs=args.num_epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        logging_steps=args.logging_steps,
        save_strategy=args.checkpoint_strategy,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        bf16=device != "cpu",  # TRL defaults to bf16, which fails on CPU
        use_cpu=device == "cpu",
        # TRL's default is on, for every layer; trainer.speed checkpoints only the layers memory demands.
        # (activation_checkpointing is transformers 5's name; gradient_checkpointing is deprecated.)
        activation_checkpointing=False,
        dataloader_num_workers=num_workers,
        # Pinned batches copied without waiting: a blocking copy makes each step start only once the GPU
        # has finished the previous one, and the GPU then idles while the host prepares the step. On CPU
        # there is no copy to overlap (and no pinned memory, which Trainer warns about).
        accelerator_config={"non_blocking": device == "cuda"},
        # Trainer's NaN check reads every step's loss back from the GPU, the same wait; a NaN loss is
        # logged as NaN instead of being replaced by the previous average.
        logging_nan_inf_filter=False,
        # Our collator needs the image and label columns, which TRL would otherwise drop.
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        disable_tqdm=not sys.stdout.isatty(),
        report_to="none",
    )


class AnswerTrainer(SFTTrainer):
    """TRL's SFTTrainer with its token metrics read from the GPU once per logging step, not every step.

    TRL's compute_loss reads entropy, token accuracy and the token count with .item() between the forward
    and the backward pass: the host waits there for the GPU to finish the forward pass, and the GPU then
    idles until the host has launched the backward pass. Here they add up on the GPU, and log() reads the
    sums once. The loss is TRL's: the negative log-likelihood of the answer tokens from its fused head.
    """

    # Entropy, correct top-1 tokens, labelled tokens, attention tokens: summed since the last log().
    metric_sums: torch.Tensor | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        # Trainer passes the token count of the whole accumulated batch, which keeps accumulation exact.
        tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(tokens).clamp(min=1)
        with torch.no_grad():
            counts = [outputs.entropy, outputs.is_top1, outputs.label_mask, inputs["attention_mask"]]
            sums = torch.stack([count.sum(dtype=torch.float64) for count in counts])
        self.metric_sums = sums if self.metric_sums is None else self.metric_sums + sums
        return (loss, outputs) if return_outputs else loss

    # The model's parameter count without embeddings, for Trainer's FLOP estimate; counted once.
    parameter_count: int | None = None

    def floating_point_ops(self, inputs: dict) -> int:
        """Trainer's estimate, 6 x input tokens x parameters, with the parameters counted once: Trainer counts
        them at every step, a walk over every module and parameter (trainer.speed.host_work)."""
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self.parameter_count is None:
            self.parameter_count = self.model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main_input].numel() * self.parameter_count

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.metric_sums is not None:
            entropy, correct, labelled, tokens = self.metric_sums.tolist()
            self.metric_sums = None
            self._total_train_tokens += int(tokens)
            metrics = self._metrics["train"]
            metrics["entropy"] = [entropy / labelled if labelled else 0.0]
            metrics["mean_token_accuracy"] = [correct / labelled if labelled else 0.0]
            metrics["num_tokens"] = [self._total_train_tokens]
        super().log(logs, start_time)


def make_trainer(
    model: PeftModel,
    processor: ProcessorMixin,
    data: PetData,
    chat: ChatFormat,
    config: SFTConfig,
    features: Container[int] | None = None,
) -> SFTTrainer:
    trainer = AnswerTrainer(
        model=model,
        args=config,
        train_dataset=data.train,
        data_collator=AnswerOnlyCollator(processor, chat, features),
        processing_class=processor,
    )
    # Replaces the dict that Trainer prints when progress bars are off.
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogLine())
    return trainer


def probe_step(trainer: SFTTrainer) -> Callable[[list[dict]], None]:
    """One forward + backward of the trainer's own training step, gradients dropped: for memory probes."""

    # Set by Trainer's loop, read by training_step: the probes run before the loop.
    trainer.current_gradient_accumulation_steps = 1

    def step(examples: list[dict]) -> None:
        inputs = trainer._prepare_inputs(trainer.data_collator(examples))
        trainer.training_step(trainer.model, inputs)
        trainer.model.zero_grad(set_to_none=True)

    return step


def set_batch_size(trainer: SFTTrainer, batch_size: int) -> None:
    """Change the batch after the trainer was built (the memory plan needs the trainer's step to measure)."""
    trainer.args.per_device_train_batch_size = batch_size
    trainer._train_batch_size = trainer.args.train_batch_size
    # The probes' steps must not show in the first logged metrics.
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    trainer.metric_sums = None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint-N that Trainer finished writing (trainer_state.json is its last file).

    A task killed while saving leaves a partial newest checkpoint, which get_last_checkpoint would pick.
    """
    complete = [
        path for path in run_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (path / "trainer_state.json").is_file()
    ]
    return max(complete, key=lambda path: int(path.name.rsplit("-", 1)[1]), default=None)


class RunState:
    """What the attempts of one Cloud Run task share through the run directory (run_state.json).

    A retry (CLOUD_RUN_TASK_ATTEMPT above 0) reuses the first attempt's baseline predictions instead of
    evaluating the untouched model again, and its batch and checkpointing plan instead of probing memory
    again: another batch would change the data order that Trainer's resume skips into. Attempt 0 starts
    afresh, so a local rerun in the same directory never reads an older run's values.
    """

    def __init__(self, run_dir: Path, attempt: int) -> None:
        self.path = run_dir / "run_state.json"
        self.values: dict = {}
        if attempt > 0 and self.path.is_file():
            self.values = json.loads(self.path.read_text())

    def get(self, key: str):
        return self.values.get(key)

    def save(self, key: str, value) -> None:
        self.values[key] = value
        # Written whole, then renamed: a task stopped mid-write leaves the previous file.
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.values) + "\n")
        os.replace(partial, self.path)


class Stopped(Exception):
    """Training ended early on SIGTERM; the message names the checkpoint the next attempt resumes from."""


class StopOnSignal(TrainerCallback):
    """SIGTERM ends training after the current optimizer step, with a checkpoint.

    Cloud Run sends SIGTERM before it stops a task (maintenance, a cancelled execution) and SIGKILL about
    10 s later. Without a handler, Python as the container's PID 1 would ignore SIGTERM, and everything
    since the last --save-steps checkpoint would be lost.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    def request(self, signum: int, frame) -> None:
        self.signal = signum

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True


def train(trainer: SFTTrainer, run_dir: Path, task_attempt: int) -> TrainOutput:
    """Resume from the last checkpoint in run_dir, if any: a retried Cloud Run task continues its run.

    Raises Stopped when SIGTERM ended training early.
    """
    checkpoint = last_complete_checkpoint(run_dir)
    log.info(
        "task attempt %d: %s", task_attempt, f"resuming from {checkpoint}" if checkpoint else "starting fresh"
    )
    stop = StopOnSignal()
    trainer.add_callback(stop)
    previous = signal.signal(signal.SIGTERM, stop.request)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stop.signal is not None:
        saved = last_complete_checkpoint(run_dir)
        raise Stopped(
            f"stopped by SIGTERM at step {trainer.state.global_step}; the next attempt resumes from {saved}"
        )
    return output
