"""Read an execution's results.json from the bucket and compare baseline with fine-tuned metrics."""

from __future__ import annotations

import json
from typing import Any

from google.api_core import exceptions

from launcher import job as jobs
from launcher.cloud import RETRY, Clients
from launcher.settings import Settings

METRICS = (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1"), ("unknown_rate", "Unknown rate"))


def results_object(execution: str) -> str:
    return f"{jobs.RUNS_PREFIX}/{jobs.short_name(execution)}/results.json"


def load(clients: Clients, settings: Settings, execution: str) -> dict[str, Any] | None:
    """The execution's results.json, or None when it has not been written (yet)."""
    blob = clients.storage.bucket(settings.bucket).blob(results_object(execution))
    try:
        return json.loads(blob.download_as_bytes(retry=RETRY))
    except exceptions.NotFound:
        return None


def rows(results: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, baseline, fine-tuned, change) for each metric present in both evaluations."""
    baseline, final = results.get("baseline", {}), results.get("final", {})
    return [
        (label, baseline[key], final[key], final[key] - baseline[key])
        for key, label in METRICS
        if key in baseline and key in final
    ]
