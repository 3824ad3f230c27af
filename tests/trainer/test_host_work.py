"""Trainer's per-step walks over the model, cut: modes still reach every module, gradients are still cleared,
and the FLOP estimate is Trainer's own."""

from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from trainer.data import chat_format, load_pets
from trainer.flags import parse_args
from trainer.modeling import load_processor
from trainer.speed import build_trainer, load_model
from trainer.speed.host_work import skip_repeated_mode_switches, zero_only_trainable_grads


class CountsSwitches(nn.Linear):
    switches = 0

    def train(self, mode: bool = True) -> nn.Module:
        CountsSwitches.switches += 1
        return super().train(mode)


def nested_model() -> nn.Module:
    model = nn.Sequential(nn.Sequential(CountsSwitches(4, 4), nn.Dropout(0.5)), nn.Linear(4, 2))
    model[1].requires_grad_(False)
    return model


def test_modes_reach_every_module_and_repeated_switches_walk_nothing() -> None:
    model = nested_model()
    skip_repeated_mode_switches(model)
    skip_repeated_mode_switches(model)  # a second trainer on the same model: still one wrapper
    CountsSwitches.switches = 0
    for _ in range(3):
        model.train()
    assert CountsSwitches.switches == 0  # it was in training mode already
    model.eval()
    assert not any(module.training for module in model.modules())
    model.eval()
    model.train()
    assert all(module.training for module in model.modules())
    assert CountsSwitches.switches == 2


def test_a_model_whose_modules_start_in_another_mode_is_made_to_agree() -> None:
    model = nested_model()
    model[0].eval()  # as a PEFT wrapper (training) around a loaded model (eval)
    skip_repeated_mode_switches(model)
    model.train()
    assert all(module.training for module in model.modules())


def test_zero_grad_clears_what_trains() -> None:
    model = nested_model()
    zero_only_trainable_grads(model)
    zero_only_trainable_grads(model)
    model(torch.randn(3, 4)).sum().backward()
    assert model[0][0].weight.grad is not None and model[1].weight.grad is None
    model.zero_grad()
    assert all(parameter.grad is None for parameter in model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    model.zero_grad(set_to_none=False)
    assert torch.equal(model[0][0].weight.grad, torch.zeros(4, 4))


def test_the_flop_estimate_is_trainers_with_the_parameters_counted_once(
    tiny_model: Path, pets: Path, tmp_path: Path
) -> None:
    model = load_model(str(tiny_model), "fp32", "cpu", None, 8, 16, 0.1)
    processor = load_processor(str(tiny_model), None)
    data = load_pets(str(pets), 16, 37, seed=0)
    args = parse_args(["--batch-size", "8", "--num-epochs", "1", "--compile", "off"])
    trainer, _ = build_trainer(
        args, model, processor, data, chat_format(processor, data.class_names), "cpu", tmp_path, None
    )
    counted = []
    count = model.num_parameters
    model.num_parameters = lambda **kwargs: counted.append(kwargs) or count(**kwargs)
    trainer.train()
    batch = trainer.data_collator([data.train[index] for index in range(8)])
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    assert len(counted) == 2  # the first step's count, and Trainer's own in the line above
    assert all(module.training for module in model.modules())
