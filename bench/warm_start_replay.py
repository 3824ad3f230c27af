"""Do loaded compiled graphs serve a reused plan's first step? The probes' order against the plan's batch.

    python bench/warm_start_replay.py cold ARTIFACTS           # probes (1, 2, 2 checkpointed), batch 8; saves
    python bench/warm_start_replay.py warm-noreplay ARTIFACTS  # loads; batch 8 straight away
    python bench/warm_start_replay.py warm-replay ARTIFACTS    # loads; the probes' steps, then batch 8

Each with its own empty TORCHINDUCTOR_CACHE_DIR, as a fresh instance has. The tiny Gemma 3 with fp8 weights,
LoRA and compiled layers, on CPU or GPU; prints the seconds of all its steps (compiling included) and
Inductor's FX graph cache misses and hits of the batch-8 step. (It replaces bench/compile_cache.py, whose
save and load are the `cold` and `warm-replay` runs here.)
A measured run stores the graphs the probes compiled, in which the batch dimension became dynamic at the
second probe; a first step at the plan's batch compiles a graph specialised to it (gpu-call34,
docs/benchmarks.md), unless trainer.speed.memory.compile_as_probes replays the probes first.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.offline.tiny import build  # noqa: E402
from trainer.speed import load_model  # noqa: E402
from trainer.speed.layers import compile_layers  # noqa: E402
from trainer.speed.memory import compile_as_probes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["cold", "warm-noreplay", "warm-replay"])
    parser.add_argument("artifacts", type=Path)
    bench = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = Path(tempfile.mkdtemp()) / "model"
    build(model_dir)
    torch.manual_seed(0)
    model = load_model(str(model_dir), "fp8", device, None, 8, 16, 0.1)
    model.train()
    if bench.mode != "cold":
        torch.compiler.load_cache_artifacts(bench.artifacts.read_bytes())
    compile_layers(model)

    def step(examples: list) -> None:
        ids = torch.randint(0, 200, (len(examples), 40), device=device)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    start = time.perf_counter()
    if bench.mode in ("cold", "warm-replay"):
        compile_as_probes(model, step, [0, 1], checkpointed=0)
    before = dict(counters["inductor"])
    step(list(range(8)))
    after = dict(counters["inductor"])
    changes = {
        key: after.get(key, 0) - before.get(key, 0) for key in ("fxgraph_cache_miss", "fxgraph_cache_hit")
    }
    totals = {key: value for key, value in after.items() if key.startswith("fxgraph_cache")}
    seconds = time.perf_counter() - start
    print(f"{bench.mode}: steps in {seconds:.1f} s; the batch-8 step {changes}; the whole process {totals}")
    if bench.mode == "cold":
        bench.artifacts.write_bytes(torch.compiler.save_cache_artifacts()[0])


if __name__ == "__main__":
    main()
