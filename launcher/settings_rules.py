"""What Google accepts for each setting, each rule with its source: GPU regions and shapes, Cloud Run's
CPU and memory table, task timeouts, Cloud Build's regions, bucket names; and the parsers of sizes and
durations. launcher/settings.py checks Settings against them; doctor and the emulator read them too.
"""

from __future__ import annotations

import re

from launcher.errors import UserError

# `--gpu none`: the same job on CPU only, which needs no GPU quota (a rehearsal on real Cloud Run).
NO_GPU = "none"
GPU_REGIONS: dict[str, tuple[str, ...]] = {
    "nvidia-rtx-pro-6000": ("us-central1", "europe-west4", "asia-southeast1"),
    "nvidia-l4": ("us-central1", "europe-west1", "europe-west4", "asia-southeast1"),
}
# "Depending on usage, certain projects may be restricted to only use Cloud Build in the following
# regions" (https://cloud.google.com/build/docs/locations#restricted_regions_for_some_projects); a new
# project may be one of them. `global` works for every project.
RESTRICTED_BUILD_REGIONS = (
    "us-central1",
    "us-west2",
    "europe-west1",
    "asia-east1",
    "australia-southeast1",
    "southamerica-east1",
)
# Cloud Run refuses a GPU instance below these (CPU count, GiB of memory): "For L4 GPUs, you must use a
# minimum of 4 CPU and 16 GiB of memory", RTX PRO 6000 "a minimum of 20 CPU and 80 GiB"
# (https://cloud.google.com/run/docs/configuring/jobs/gpu).
GPU_MINIMUMS: dict[str, tuple[float, float]] = {
    "nvidia-rtx-pro-6000": (20, 80),
    "nvidia-l4": (4, 16),
}
# An RTX PRO 6000 instance takes 20 or 22 vCPU and at most 4 GiB per vCPU (Cloud Run's answers to
# validateOnly requests; the docs give only the minimum). The emulator refuses the same
# (emulator/run_validation.py).
RTX_CPUS = (20.0, 22.0)
RTX_GIB_PER_CPU = 4
# Any other job: 1, 2, 4, 6 or 8 vCPU, each with its memory range in GiB ("vCPU and memory table",
# https://cloud.google.com/run/docs/configuring/jobs/cpu; 512 MiB at least, 32 GiB at most,
# https://cloud.google.com/run/docs/configuring/jobs/memory-limits).
JOB_MEMORY_GIB: dict[float, tuple[float, float]] = {
    1: (0.5, 4),
    2: (0.5, 8),
    4: (2, 16),
    6: (4, 24),
    8: (4, 32),
}
# (cpu, memory) when not set: the tutorial's RTX PRO 6000 shape, else the largest shape of the table.
DEFAULT_SHAPES: dict[str, tuple[str, str]] = {
    "nvidia-rtx-pro-6000": ("20", "80Gi"),
    "nvidia-l4": ("8", "32Gi"),
    NO_GPU: ("8", "32Gi"),
}
# Preview GPUs are only accepted on a job whose launch stage opts into preview features.
PREVIEW_GPUS = {"nvidia-rtx-pro-6000"}
# https://cloud.google.com/run/docs/configuring/task-timeout: 168 h for a task, but "For tasks using GPUs,
# the maximum available timeout is 12 hours (preview)" ("Long running GPU jobs"), 1 hour at GA.
GA_GPU_TIMEOUT_S = 3600
MAX_GPU_TIMEOUT_S = 12 * 3600

REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_MEMORY = re.compile(r"^(?P<number>\d+(\.\d+)?)(?P<unit>Gi|G|Mi|M)$")
_CPU = re.compile(r"^(?P<number>\d+(\.\d+)?)(?P<milli>m?)$")
_DURATION = re.compile(r"^(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?$")

MIN_TIMEOUT_S = 10
MAX_TIMEOUT_S = 168 * 3600


def parse_duration(text: str) -> int:
    """'6h', '90m', '1h30m', '3600s' or '3600' -> seconds."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    match = _DURATION.match(text)
    if not text or not match:
        raise ValueError(f"{text!r} is not a duration like 6h, 90m, 1h30m or 3600s")
    return int(match["h"] or 0) * 3600 + int(match["m"] or 0) * 60 + int(match["s"] or 0)


def memory_gib(text: str) -> float:
    match = _MEMORY.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a memory size like 80Gi, 32G or 16384Mi")
    factor = {"Gi": 1.0, "G": 1e9 / 2**30, "Mi": 1 / 1024, "M": 1e6 / 2**30}[match["unit"]]
    return float(match["number"]) * factor


def cpu_count(text: str) -> float:
    match = _CPU.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a CPU count like 20 or 4000m")
    return float(match["number"]) / (1000 if match["milli"] else 1)


def check_bucket(name: str) -> None:
    if (
        not _BUCKET.match(name)
        or ".." in name
        or name.startswith("goog")
        or "google" in name
        or _IPV4.match(name)
    ):
        raise UserError(
            f"Bucket name {name!r} is invalid: 3-63 lower-case letters, digits, '-', '_' and '.', starting "
            "and ending with a letter or digit, not starting with 'goog' nor containing 'google'.",
            "Choose another with --bucket or $BUCKET_NAME (the default is <project>-gemma3-finetuning).",
        )
