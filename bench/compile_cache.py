"""Whether torch.compile's cache artifacts carry the trainer's compiled layers into a fresh process.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_cache.py save OUT.bin
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_cache.py load OUT.bin

A tiny Gemma 3 with fp8 weights, the trainer's adapters and per-layer compile
(trainer.speed.layers.compile_layers) runs two training steps of its language model; `save` then writes
torch.compiler.save_cache_artifacts(), `load` reads them with torch.compiler.load_cache_artifacts() before
compiling. Each prints the time of its two steps and Inductor's cache hits and misses. Each command needs
its own empty Inductor cache directory, as a fresh instance has, or the local cache answers instead of the
artifacts. CPU or CUDA.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import Gemma3Config, Gemma3ForConditionalGeneration  # noqa: E402

from trainer.offline.tiny import tiny_shapes  # noqa: E402
from trainer.speed import with_adapters  # noqa: E402
from trainer.speed.layers import compile_layers, gemma_backbone  # noqa: E402
from trainer.speed.weights import store_weights  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "load"):
        raise SystemExit(__doc__)
    mode, path = sys.argv[1], Path(sys.argv[2])
    if mode == "load":
        start = time.perf_counter()
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        print(f"loaded {path.stat().st_size} bytes in {time.perf_counter() - start:.2f} s: {info}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = Gemma3Config(**tiny_shapes(1024))
    with torch.device(device):
        model = Gemma3ForConditionalGeneration(config).requires_grad_(False)
    store_weights(model, "fp8")
    model = with_adapters(model, "bf16", 8, 16, 0.05)
    model.train()
    compile_layers(model)
    language_model = gemma_backbone(model).language_model
    hidden = torch.randn(2, 64, config.text_config.hidden_size, device=device)
    start = time.perf_counter()
    for _ in range(2):
        out = language_model(inputs_embeds=hidden, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()
    print(f"{mode}: two steps, compile included, {time.perf_counter() - start:.2f} s")
    counters = torch._dynamo.utils.counters["inductor"]
    print({key: value for key, value in counters.items() if "cache" in key})
    if mode == "save":
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise SystemExit("no cache artifacts to save")
        path.write_bytes(artifacts[0])
        print(f"saved {len(artifacts[0])} bytes: {artifacts[1]}")


if __name__ == "__main__":
    main()
