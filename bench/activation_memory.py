"""What one decoder layer of real-size Gemma 3 keeps for its backward pass, per training sample.

    python bench/activation_memory.py --arch 27b                      # CPU, eager, the trainer's LoRA
    python bench/activation_memory.py --arch 27b --compile --lora-dropout 0 --quantization int8

Builds the language model from the published config (bench/configs) with few layers and a small
vocabulary, random bf16 weights, the trainer's adapters (trainer.speed.with_adapters), int8 or fp8
weights (trainer.speed.weights.store_weights) and per-layer compile (trainer.speed.layers.compile_layers)
as asked, then runs one forward pass of one sample (470 tokens by default) under bf16 autocast, as TRL's
trainer does, and records every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks), each
storage once and parameters never. Two models that differ by `--layers` layers give the bytes of one
layer; the listing groups them by shape and dtype. Runs on CPU in about a minute per setting; on CUDA with
--device cuda.
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch_settings  # noqa: E402

from trainer.speed import with_adapters  # noqa: E402
from trainer.speed.layers import compile_layers, gemma_backbone  # noqa: E402
from trainer.speed.weights import store_weights  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MIB = 2**20


def build(arch: str, layers: int, args: argparse.Namespace):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    raw = json.loads((CONFIGS / f"gemma-3-{arch}-it.json").read_text())
    raw["vision_config"]["num_hidden_layers"] = 1
    # The layers' shapes are what matters; a small vocabulary keeps the embeddings out of the way.
    raw["text_config"].update(num_hidden_layers=layers, layer_types=None, vocab_size=1024)
    config = Gemma3Config(**raw)
    config.text_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = Gemma3ForConditionalGeneration(config).requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    store_weights(model, args.quantization)
    model = with_adapters(model, "bf16", 16, 32, args.lora_dropout)
    model.train()
    if args.compile:
        compile_layers(model)
    return model


def saved_bytes(model, args: argparse.Namespace) -> tuple[int, Counter]:
    """Bytes autograd keeps for the backward pass of one forward, and the same bytes by (shape, dtype)."""
    language_model = gemma_backbone(model).language_model
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_kind: Counter = Counter()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in parameters:
            seen.add(storage.data_ptr())
            by_kind[(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))] += storage.nbytes()
        return tensor

    hidden = torch.randn(
        1, args.tokens, language_model.config.hidden_size, dtype=torch.bfloat16, device=args.device
    )
    with (
        torch.autocast(torch.device(args.device).type, torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        language_model(inputs_embeds=hidden, use_cache=False)
    return sum(by_kind.values()), by_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["4b", "27b"], default="27b")
    parser.add_argument("--tokens", type=int, default=470, help="sample length (the benchmark's: 470)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--quantization", choices=["none", "int8", "fp8"], default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer, as the trainer")
    parser.add_argument("--layers", type=int, default=2, help="layers between the two models compared")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--set", action="append", default=[], metavar="MODULE.NAME=VALUE", help="bench/torch_settings.py"
    )
    args = parser.parse_args()
    torch_settings.apply(args.set)
    torch.manual_seed(0)
    small_total, small_kinds = saved_bytes(build(args.arch, 1, args), args)
    large_total, large_kinds = saved_bytes(build(args.arch, 1 + args.layers, args), args)
    per_layer = (large_total - small_total) / args.layers
    setting = f"{args.arch}, dropout {args.lora_dropout}, {args.quantization}, compile {args.compile}"
    setting += "".join(f", {item}" for item in args.set)
    print(f"{setting}: {per_layer / MIB:.1f} MiB per layer per sample of {args.tokens} tokens")
    large_kinds.subtract(small_kinds)
    for (shape, dtype), size in large_kinds.most_common():
        if size > 0:
            print(f"  {size / args.layers / MIB:8.1f} MiB  {dtype:9} {shape}")


if __name__ == "__main__":
    main()
