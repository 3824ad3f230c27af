"""Gemma 3's decoder layers, and the two levers applied to them one by one: torch.compile and gradient
checkpointing."""

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedModel


def gemma_backbone(model: nn.Module) -> nn.Module:
    """The Gemma3Model inside a Gemma3ForConditionalGeneration, with or without PEFT around it."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return base.model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return gemma_backbone(model).language_model.layers


def compile_layers(model: nn.Module) -> None:
    """torch.compile each decoder layer on its own: one graph per layer kind, reused by all layers.

    Compiling the whole model would trace PEFT's and Trainer's Python around the layers and break the graph
    at each of them; one layer is a clean graph (attention, norms, GeGLU and LoRA fused). Shapes start
    static (kernels specialised to the model's widths) and a dimension that changes, like the batch between
    the memory probes and training, becomes dynamic after one recompile.
    """
    # Sliding and full attention layers, training and no-grad graphs: a few entries per layer code object.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    for layer in decoder_layers(model):
        layer.compile()


def set_checkpointed_layers(model: PreTrainedModel, count: int) -> None:
    """Gradient checkpointing on `count` decoder layers spread evenly, none on the others.

    Checkpointing a layer keeps only its input and runs its forward again in the backward pass: a third more
    work for that layer, so the plan checkpoints only as many layers as the memory budget demands.
    """
    layers = decoder_layers(model)
    if count > 0:
        base = model.get_base_model() if isinstance(model, PeftModel) else model
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # The embeddings are frozen: without this, checkpointed layers would get inputs that need no
        # gradient and LoRA would receive none.
        base.enable_input_require_grads()
    chosen = {i * len(layers) // count for i in range(count)} if count else set()
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index in chosen
