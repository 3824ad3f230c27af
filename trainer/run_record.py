"""What the report page needs besides results.json, written next to it: every test image's prediction
(predictions.json), the training curve (training_curve.json) and the gallery's thumbnails
(thumbnails.json), so that `gemma-launch report` reads the bucket only, whatever the dataset's format.
And what results.json records of the run's time and place: its phases' seconds, when the task attempt
started and the region Cloud Run ran it in, from which `gemma-launch` rebuilds a run's duration and cost
once Cloud Run's record of it is gone (launcher/kept_costs.py)."""

import http.client
import io
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
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


# Cloud Run's metadata server (https://cloud.google.com/run/docs/container-contract#metadata-server)
# answers `instance/region` with "projects/PROJECT-NUMBER/regions/REGION", to requests that carry
# `Metadata-Flavor: Google`. Its host: the one google-auth reads too (GCE_METADATA_HOST, which the
# emulator sets), else the name every instance resolves.
METADATA_HOST_ENV = "GCE_METADATA_HOST"
METADATA_HOST = "metadata.google.internal"
REGION_PATH = "/computeMetadata/v1/instance/region"
REGION_ANSWER = re.compile(r"projects/[^/]+/regions/([a-z0-9-]+)")
# The server is on the instance: it answers in milliseconds, or is not there.
METADATA_TIMEOUT_S = 2.0


def process_started() -> datetime:
    """When this process started, as the kernel records it: the container's start of a Cloud Run task
    attempt, imports included (seconds of torch and transformers before main() runs); now where /proc
    does not say (not Linux)."""
    now = datetime.now(UTC)
    try:
        # proc(5): field 22 of /proc/self/stat, starttime, is in clock ticks after boot (the fields after
        # the command's closing parenthesis start at field 3); /proc/uptime, the seconds since boot now.
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return now
    return now - timedelta(seconds=max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0))


def cloud_run_region(environ: Mapping[str, str] = os.environ) -> str | None:
    """The region Cloud Run runs this task in, as its metadata server tells it; None outside a Cloud Run
    job (no CLOUD_RUN_EXECUTION: nothing is asked) or when the server gives no region."""
    if not environ.get("CLOUD_RUN_EXECUTION"):
        return None
    host = environ.get(METADATA_HOST_ENV) or METADATA_HOST
    request = urllib.request.Request(f"http://{host}{REGION_PATH}", headers={"Metadata-Flavor": "Google"})
    # No proxy: the metadata server is on the instance, where no proxy reaches.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=METADATA_TIMEOUT_S) as response:
            answer = response.read().decode().strip()
    except (OSError, http.client.HTTPException, ValueError):
        return None
    found = REGION_ANSWER.fullmatch(answer)
    return found[1] if found else None


def attempt_record(started: datetime, region: str | None) -> dict[str, str | None]:
    """results.json's "started" (UTC, ISO 8601, to the second) and "region" (None outside Cloud Run)."""
    return {"started": started.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "region": region}


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
