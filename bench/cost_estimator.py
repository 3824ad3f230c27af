"""The cost estimator's durations against recorded runs: predicted vs actual, and the error.

    python bench/cost_estimator.py                          # every "ours" row of bench/results/gpu.jsonl
    python bench/cost_estimator.py RESULTS.json [...] --gpu nvidia-rtx-pro-6000   # finished executions

For a row of bench/results/gpu.jsonl (one phase on the H200 the benchmarks ran on) the estimator's
built-in rate for that model and phase (launcher/cost.py BUILT_IN, at the H200's scale of 1) is compared
with the rate measured, as the time to train or evaluate 1,000 images. For an execution's results.json
(gs://BUCKET/runs/EXECUTION/results.json) the whole predicted duration for the GPU given (its flags as the
trainer recorded them) is compared with what the trainer measured: the sum of `phases` when present,
else its training time alone against the predicted training time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from launcher import cost

RESULTS = Path(__file__).parent / "results" / "gpu.jsonl"
IMAGES = 1000


def benchmark_rows(path: Path) -> list[tuple[str, float, float]]:
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if not str(row.get("config", "")).startswith("ours") or row.get("arch") not in cost.BUILT_IN:
            continue
        train, evaluate, _ = cost.BUILT_IN[row["arch"]]
        if row.get("phase") == "train":
            predicted, measured = train, row["samples_per_s"]
        elif row.get("phase") == "eval":
            predicted, measured = evaluate, row.get("samples_per_s_with_feature_pass") or row["samples_per_s"]
        else:
            continue
        memory = f", within {row['max_memory_gib']:g} GiB" if row.get("max_memory_gib") else ""
        label = f"{row['arch']} {row['phase']} {row['config']} ({row.get('date', '?')}{memory})"
        rows.append((label, IMAGES / predicted, IMAGES / measured))
    return rows


def execution_rows(paths: list[Path], gpu: str) -> list[tuple[str, float, float]]:
    rows = []
    for path in paths:
        found = json.loads(path.read_text())
        flags = (found.get("settings") or {}).get("flags") or {}
        # The sizes the run used, as recorded: what the duration model reads (other recorded flags, such
        # as booleans, are not in the form the trainer's parser takes back).
        size_flags = ("train-size", "eval-size", "num-epochs")
        args = [item for key in size_flags if key in flags for item in (f"--{key}", str(flags[key]))]
        rates = cost.built_in_rates(gpu, str(found.get("model_id", "")))
        phases = found.get("phases") or {}
        if phases:
            rows.append(
                (f"{path} (whole run)", cost.duration_s(rates, args), sum(map(float, phases.values())))
            )
        elif (found.get("train") or {}).get("runtime_s"):
            train_size, _, epochs = cost.sizes(args)
            predicted = train_size * epochs / rates.train_per_s
            rows.append((f"{path} (training)", predicted, float(found["train"]["runtime_s"])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results.json of finished executions")
    parser.add_argument("--gpu", default="nvidia-rtx-pro-6000", choices=sorted(cost.GPU_SCALE))
    args = parser.parse_args()
    rows = execution_rows(args.results, args.gpu) if args.results else benchmark_rows(RESULTS)
    print(f"{'run':<70} {'predicted s':>12} {'actual s':>10} {'error':>8}")
    for label, predicted, actual in rows:
        print(f"{label:<70} {predicted:>12.1f} {actual:>10.1f} {predicted / actual - 1:>+8.1%}")


if __name__ == "__main__":
    main()
