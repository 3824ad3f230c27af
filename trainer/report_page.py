"""The report page of one or more runs: one self-contained HTML file (no CDN, images embedded).

Shared by the trainer, which writes report.html next to results.json, and by `gemma-launch report`, which
renders the same files read from the bucket. It imports neither torch nor launcher/ (docs/architecture.md).
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from pathlib import Path
from typing import IO, Any

import jinja2
from PIL import Image

TEMPLATES = Path(__file__).parent / "templates"
THUMBNAIL_PX = 128  # longest side: 18 JPEGs of ~5 KB keep a page of 37 classes well under a MB
GALLERY_MISTAKES, GALLERY_SUCCESSES = 12, 6
CONFUSED_PAIRS = 10
METRICS = (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("unknown_rate", "Unknown rate"))
CURVES = (("loss", "Training loss"), ("learning_rate", "Learning rate"), ("grad_norm", "Gradient norm"))


def gallery_indices(images: list[dict[str, Any]]) -> list[int]:
    """The fine-tuned model's first mistakes and first successes, in test-set order."""
    wrong = [n for n, image in enumerate(images) if image["final"]["predicted"] != image["true"]]
    right = [n for n, image in enumerate(images) if image["final"]["predicted"] == image["true"]]
    return wrong[:GALLERY_MISTAKES] + right[:GALLERY_SUCCESSES]


def thumbnail(source: IO[bytes]) -> str:
    """A JPEG data URI of the image, its longest side THUMBNAIL_PX."""
    with Image.open(source) as image:
        small = image.convert("RGB")
        small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        small.save(out, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _f1_by_breed(images: list[dict[str, Any]], stage: str) -> dict[str, float]:
    """Per-breed F1 of one model's predictions (as sklearn computes it, 0 where undefined)."""
    hits, predicted, actual = Counter(), Counter(), Counter()
    for image in images:
        guess = image[stage]["predicted"]
        actual[image["true"]] += 1
        predicted[guess] += 1
        hits[guess] += guess == image["true"]
    scores = {}
    for name in actual:
        denominator = predicted[name] + actual[name]
        scores[name] = 2 * hits[name] / denominator if denominator else 0.0
    return scores


def _curve(points: list[dict[str, Any]], key: str, width: int = 520, height: int = 150) -> dict[str, Any]:
    """An SVG polyline of one series against the step, scaled into width x height."""
    values = [(point["step"], point[key]) for point in points if isinstance(point.get(key), int | float)]
    values = [(step, value) for step, value in values if value == value]  # NaN losses are left out
    if not values:
        return {"points": "", "low": None, "high": None, "first": None, "last": None}
    steps = [step for step, _ in values]
    low, high = min(value for _, value in values), max(value for _, value in values)
    span_x, span_y = (max(steps) - min(steps)) or 1, (high - low) or 1
    coords = " ".join(
        f"{(step - min(steps)) / span_x * width:.1f},{height - (value - low) / span_y * height:.1f}"
        for step, value in values
    )
    return {"points": coords, "low": low, "high": high, "first": steps[0], "last": steps[-1]}


def _confusion(images: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    counts = Counter((image["true"], image["final"]["predicted"]) for image in images)
    most = max(counts.values(), default=1)
    rows = [
        {
            "name": true,
            "cells": [{"count": counts[true, guess], "share": counts[true, guess] / most} for guess in names],
        }
        for true in names
    ]
    pairs = sorted(
        (
            (count, true, guess)
            for (true, guess), count in counts.items()
            if true != guess and guess is not None
        ),
        key=lambda pair: (-pair[0], pair[1], pair[2]),
    )[:CONFUSED_PAIRS]
    return {"rows": rows, "pairs": [{"true": t, "predicted": g, "count": c} for c, t, g in pairs]}


def run_page(
    results: dict[str, Any],
    predictions: dict[str, Any] | None,
    curve: list[dict[str, Any]] | None,
    thumbnails: dict[str, str] | None,
    name: str = "",
    cost: str | None = None,
) -> dict[str, Any]:
    """What the template shows of one run, from the files the trainer writes next to results.json.
    `cost`: what it cost, as `gemma-launch report` knows it (the trainer does not)."""
    images = (predictions or {}).get("images") or []
    settings = results.get("settings", {})
    phases = results.get("phases") or {}
    baseline_f1 = _f1_by_breed(images, "baseline") if images else {}
    breeds = [
        {**row, "change": row["f1"] - baseline_f1[row["name"]] if row["name"] in baseline_f1 else None}
        for row in results.get("per_class", [])
    ]
    breeds.sort(key=lambda row: (row["f1"], row["name"]))  # worst first
    names = (predictions or {}).get("class_names") or [row["name"] for row in results.get("per_class", [])]
    gallery = [
        {
            **images[n],
            "thumbnail": (thumbnails or {}).get(images[n]["path"]),
            "correct": images[n]["final"]["predicted"] == images[n]["true"],
        }
        for n in gallery_indices(images)
    ]
    duration = f"{sum(phases.values()):.1f} s" if phases else None
    return {
        "name": name or results.get("execution") or "local run",
        "duration": duration,
        "results": results,
        "metrics": [
            {
                "label": label,
                "baseline": results.get("baseline", {}).get(key),
                "final": results.get("final", {}).get(key),
            }
            for key, label in METRICS
        ],
        "run": [
            ("model", results.get("model_id")),
            ("dataset", results.get("dataset")),
            ("training images", results.get("train_size")),
            ("test images", results.get("eval_size")),
            ("evaluation method", results.get("eval_method")),
            ("platform", results.get("platform") or settings.get("resolved", {}).get("device")),
            ("training steps", results.get("train", {}).get("steps")),
            ("duration", duration),
            ("cost", cost or "not known"),
        ],
        "phases": phases,
        "settings": {**settings.get("flags", {}), **settings.get("resolved", {})},
        "breeds": breeds,
        "confusion": _confusion(images, names) if images else None,
        "curves": [{"label": label, "key": key, **_curve(curve or [], key)} for key, label in CURVES],
        "gallery": gallery,
        "scored": (predictions or {}).get("eval_method", results.get("eval_method")) != "generate",
    }


def _comparison(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The leaderboard (best final accuracy first) and each breed's F1 side by side."""
    board = sorted(runs, key=lambda run: -(run["results"].get("final", {}).get("accuracy") or 0))
    breeds = sorted({row["name"] for run in runs for row in run["breeds"]})
    f1 = [{row["name"]: row["f1"] for row in run["breeds"]} for run in runs]
    return {
        "leaderboard": board,
        "side_by_side": [{"name": breed, "f1": [scores.get(breed) for scores in f1]} for breed in breeds],
    }


def render(runs: list[dict[str, Any]]) -> str:
    """The HTML page of one run, or of several with a leaderboard and a side-by-side comparison."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    environment.filters["pct"] = lambda value: "–" if value is None else f"{value:.1%}"
    environment.filters["num"] = lambda value: "–" if value is None else f"{value:.3f}"
    environment.filters["pp"] = lambda value: "–" if value is None else f"{value * 100:+.1f} pp"
    environment.filters["short"] = lambda value: "–" if value is None else f"{value:.3g}"
    for number, run in enumerate(runs, start=1):
        run["anchor"] = f"run-{number}"  # section ids stay unique with several runs on the page
    comparison = _comparison(runs) if len(runs) > 1 else None
    return environment.get_template("report.html.j2").render(runs=runs, comparison=comparison)
