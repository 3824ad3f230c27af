"""What the report page needs besides results.json, written next to it: every test image's prediction
(predictions.json), the training curve (training_curve.json) and the gallery's thumbnails
(thumbnails.json), so that `gemma-launch report` reads the bucket only, whatever the dataset's format."""

import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import datasets

from trainer import report_page

# Seconds per phase, results.json's "phases": the cost estimator reads exactly these keys.
PHASES = ("load_s", "image_features_s", "baseline_s", "memory_plan_s", "train_s", "final_eval_s", "save_s")


class PhaseClock:
    """Wall-clock seconds of each phase of a run; a phase an attempt skips (a reused baseline) counts 0."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 2) for name, value in self.seconds.items()}


def image_paths(split: datasets.Dataset, dataset: str) -> list[str]:
    """Each image's path relative to the dataset root, else the path it was stored under (parquet)."""
    root = Path(dataset).expanduser().resolve()
    paths = []
    for row, item in enumerate(split.cast_column("image", datasets.Image(decode=False))["image"]):
        path = Path(item.get("path") or "")
        if item.get("bytes") is None and path.is_absolute() and path.is_relative_to(root):
            paths.append(path.relative_to(root).as_posix())
        else:
            paths.append(item.get("path") or f"test/{row}")
    return paths


def predictions_document(
    paths: list[str],
    labels: list[int],
    class_names: list[str],
    method: str,
    baseline: tuple[list[int], list | None],
    final: tuple[list[int], list | None],
) -> dict[str, Any]:
    """predictions.json: per test image its path, true breed, and each model's prediction and top-5."""

    def stage(index: int, predicted: tuple[list[int], list | None]) -> dict[str, Any]:
        guess, ranked = predicted[0][index], predicted[1]
        return {
            "predicted": class_names[guess] if guess >= 0 else None,
            "top5": [[class_names[k], p] for k, p in ranked[index]] if ranked is not None else None,
        }

    return {
        "eval_method": method,
        "class_names": class_names,
        "images": [
            {
                "path": path,
                "true": class_names[label],
                "baseline": stage(index, baseline),
                "final": stage(index, final),
            }
            for index, (path, label) in enumerate(zip(paths, labels, strict=True))
        ],
    }


def training_curve(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Loss, learning rate and gradient norm per logging step (the log history less its end summary)."""
    keys = ("epoch", "loss", "learning_rate", "grad_norm")
    return [
        {"step": entry["step"], **{key: entry[key] for key in keys if key in entry}}
        for entry in log_history
        if "loss" in entry
    ]


def thumbnails(split: datasets.Dataset, predictions: dict[str, Any]) -> dict[str, str]:
    """The gallery's images, downsized, as data URIs keyed by path (the page embeds them)."""
    images = split.cast_column("image", datasets.Image(decode=False))["image"]
    found = {}
    for index in report_page.gallery_indices(predictions["images"]):
        item = images[index]
        data = item.get("bytes") or Path(item["path"]).read_bytes()
        found[predictions["images"][index]["path"]] = report_page.thumbnail(io.BytesIO(data))
    return found


def write(run_dir: Path, name: str, document: Any) -> None:
    (run_dir / name).write_text(json.dumps(document, indent=1) + "\n")
