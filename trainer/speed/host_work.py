"""The host work transformers' Trainer does on the whole model at every step, cut to what can change.

Before every step Trainer calls model.train(), and after it model.zero_grad(): the first walks every module
(about 5,500 in Gemma 3 27B with LoRA on the language model), the second every parameter, though the modes
only change when evaluation runs and only the adapters have gradients. When a step waits for the host (27B
on the H200 in the image's environment: the GPU busy 70 % of each step, docs/benchmarks.md), these walks are
time the GPU idles. (Trainer's third walk, counting the parameters for its FLOP estimate, is cached in
trainer.train.AnswerTrainer.)
"""

import functools

from torch import nn


def skip_repeated_mode_switches(model: nn.Module) -> None:
    """model.train(mode) and model.eval() walk the modules only when the model's mode changes.

    Sound while modes change through the model itself, as Trainer and the evaluation change them; a
    submodule switched on its own would be left as it is by a later call in the model's current mode.
    """
    switch = model.train
    if getattr(switch, "skips_repeats", False):
        return

    @functools.wraps(switch)
    def train(mode: bool = True) -> nn.Module:
        if model.training == mode:
            return model
        return switch(mode)

    # A model can start with its modules in other modes than itself (a PEFT wrapper is created in training
    # mode around a model loaded in eval mode): one full walk makes them agree.
    switch(model.training)
    train.skips_repeats = True
    # An instance attribute shadows nn.Module.train; nn.Module.eval() calls self.train(False), so it too.
    model.train = train


def zero_only_trainable_grads(model: nn.Module) -> None:
    """model.zero_grad() clears the gradients of the parameters that train, the only ones that have any."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    clear = getattr(model.zero_grad, "clears", model.zero_grad)

    @functools.wraps(clear)
    def zero_grad(set_to_none: bool = True) -> None:
        if not set_to_none:
            clear(set_to_none)
            return
        for parameter in trainable:
            parameter.grad = None

    zero_grad.clears = clear  # installed again (a later trainer), it wraps the model's own method
    model.zero_grad = zero_grad
