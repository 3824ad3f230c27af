"""The training step never waits for the GPU, and logs what TRL's SFTTrainer logs."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForImageTextToText, TrainerCallback
from trl import SFTTrainer

from trainer.data import chat_format, load_pets
from trainer.flags import parse_args
from trainer.modeling import add_adapters, load_processor
from trainer.speed import build_trainer, speed_up
from trainer.train import AnswerOnlyCollator, make_trainer, sft_config

# Operators whose result the host must read back from the device: on a GPU each one waits for its queue.
pytestmark = pytest.mark.slow

READS_BACK = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero"}


class CountReadsBack(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._overloadpacket.__name__ in READS_BACK:
            self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class ReadsBackPerStep(TrainerCallback):
    """Watches each step from its start to its end (forward, backward, optimizer), not the logging between."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []
        self.mode: CountReadsBack | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.mode = CountReadsBack()
        self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self.mode.__exit__(None, None, None)
        self.steps.append(self.mode.names)


ARGS = ["--num-epochs", "1", "--logging-steps", "1", "--learning-rate", "1e-3", "--batch-size", "8"]


def adapted_model(tiny_model: Path):
    """The tiny model with fresh adapters, the same for every call."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    return add_adapters(model, "fp32", lora_r=8, lora_alpha=16, lora_dropout=0.0)


@pytest.fixture
def tiny_setup(tiny_model: Path, pets: Path):
    """Tiny model with fresh adapters, 48 training images: 6 steps of 8 samples."""
    model = adapted_model(tiny_model)
    processor = load_processor(str(tiny_model), None)
    data = load_pets(str(pets), 48, 37, seed=0)
    return model, processor, data, chat_format(processor, data.class_names)


def test_training_steps_read_nothing_back_from_the_device(tiny_setup, tmp_path: Path) -> None:
    model, processor, data, chat = tiny_setup
    args = parse_args([*ARGS, "--logging-steps", "3"])
    # The run's own setup: stored image features, as on a GPU.
    features = speed_up(args, model, processor, data, "cpu")
    trainer, _ = build_trainer(args, model, processor, data, chat, "cpu", tmp_path, features)
    watch = ReadsBackPerStep()
    trainer.add_callback(watch)
    trainer.train()
    assert watch.steps == [[]] * 6
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [3, 6]


def test_logged_loss_and_token_metrics_equal_trl(tiny_setup, tiny_model: Path, tmp_path: Path) -> None:
    model, processor, data, chat = tiny_setup
    config = sft_config(parse_args(ARGS), tmp_path / "ours", "cpu", batch_size=8)
    ours = make_trainer(model, processor, data, chat, config)
    ours.train()

    trl = SFTTrainer(
        model=adapted_model(tiny_model),
        args=sft_config(parse_args(ARGS), tmp_path / "trl", "cpu", batch_size=8),
        train_dataset=data.train,
        data_collator=AnswerOnlyCollator(processor, chat),
        processing_class=processor,
    )
    trl.train()

    ours_logs = [entry for entry in ours.state.log_history if "loss" in entry]
    trl_logs = [entry for entry in trl.state.log_history if "loss" in entry]
    assert len(ours_logs) == len(trl_logs) == 6
    for mine, theirs in zip(ours_logs, trl_logs, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
        assert mine["num_tokens"] == theirs["num_tokens"]
