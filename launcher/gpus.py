"""What each Cloud Run GPU can run: the image's CUDA against the GPU's driver, and which Gemma 3 size fits
its memory in which base weights, as measured (docs/benchmarks.md, "What each GPU holds").

`up` and `run` check the job's GPU, model and --quantization here before anything is created or started:
a combination that cannot run is a UserError with the combinations that can; one that runs only slowly,
or was not measured, is said and goes on. The driver is checked first: a GPU the image cannot use at all
makes every model question moot, and its hint (another GPU) is the one that fixes both. A model the table
does not know (another size, a local directory of another name and shape) is not checked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError


@dataclass(frozen=True)
class Gpu:
    name: str
    gigabytes: int  # as sold: "an L4 (24 GB)"
    memory_gib: int  # the trainer's --max-memory-gib on it: what its rows below were measured within
    driver: str  # the NVIDIA driver Cloud Run runs it with
    cuda: int  # the newest CUDA major version that driver runs


# Cloud Run's drivers, "Supported GPU types" (https://cloud.google.com/run/docs/configuring/jobs/gpu):
# RTX PRO 6000 580 (CUDA 13.0), L4 535.216.03 (CUDA 12.2). A build for CUDA 13 needs driver 580 or newer,
# one for CUDA 12 525 or newer ("CUDA 13.x >= 580", "CUDA 12.x >= 525":
# https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html).
GPUS: dict[str, Gpu] = {
    # 85 of 96 GB leaves the CUDA context and the allocator's fragmentation their room.
    "nvidia-rtx-pro-6000": Gpu("RTX PRO 6000", 96, 85, "580", 13),
    # The L4 reports 22.5 GiB; issue 21 measured within 22.
    "nvidia-l4": Gpu("L4", 24, 22, "535.216.03", 12),
}

# The torch that `up`'s image installs (requirements.lock): PyPI's 2.13.0, built for CUDA 13
# (nvidia-cuda-runtime 13.0.96). PyPI's last CUDA 12 build is torch 2.10.0 (CUDA 12.8), older than the
# trainer's torch>=2.13 (docs/container.md). One image serves every GPU today; an image for the L4 with a
# CUDA 12 torch would set its entry to 12 and switch the L4 on.
IMAGE_TORCH = "2.13.0"
IMAGE_CUDA: dict[str, int] = {"nvidia-rtx-pro-6000": 13, "nvidia-l4": 13}


@dataclass(frozen=True)
class Model:
    name: str
    hub_id: str
    # The text model's (hidden_size, num_hidden_layers): how a local copy is recognised by its config.
    text_shape: tuple[int, int]


# Largest first: a GPU's default model is the first that runs on it.
MODELS: dict[str, Model] = {
    "27b": Model("Gemma 3 27B", "google/gemma-3-27b-it", (5376, 62)),
    "4b": Model("Gemma 3 4B", "google/gemma-3-4b-it", (2560, 34)),
}
DEFAULT_MODEL = "27b"

# What the trainer's --quantization auto takes on each GPU, within its memory_gib (trainer/modeling.py,
# precision_for; fp8 only on Hopper, which Cloud Run does not offer): bf16 when its weights take at most
# half the budget, else int8 when those do and bf16 loads within 90 % of the GPU, else 4-bit.
# tests/launcher/test_gpus.py checks these against the trainer's own rule.
AUTO: dict[tuple[str, str], str] = {
    ("nvidia-rtx-pro-6000", "27b"): "int8",
    ("nvidia-rtx-pro-6000", "4b"): "bf16",
    ("nvidia-l4", "27b"): "4bit",
    ("nvidia-l4", "4b"): "bf16",
}


@dataclass(frozen=True)
class Fit:
    verdict: str  # runs | slow (said, and goes on) | no (refused)
    why: str  # the evidence: where it was measured, or what the estimate rests on
    measured: bool = True


_H200_85 = "on an H200 capped at 85 GiB (bench/results/gpu.jsonl)"
_H200_22 = "on an H200 capped at 22 GiB"
_SMALLER = "estimated: its weights are smaller than bf16's, which fit"
# Weights of the published configs (bench/configs), as the trainer logs them: 4B 8.0 GiB in bf16, 5.0 in
# int8 or fp8; 27B 51.1 and 27.3.
FITS: dict[tuple[str, str, str], Fit] = {
    # RTX PRO 6000: measured on the H200 within its 85 GiB; the RTX PRO 6000 itself was not measured.
    ("nvidia-rtx-pro-6000", "27b", "bf16"): Fit("runs", f"batch 2, 4.9 samples/s {_H200_85}, first session"),
    ("nvidia-rtx-pro-6000", "27b", "int8"): Fit("runs", f"batch 9, 9.0-9.6 samples/s {_H200_85}"),
    ("nvidia-rtx-pro-6000", "27b", "fp8"): Fit("runs", f"batch 9, 12.0 samples/s {_H200_85}"),
    ("nvidia-rtx-pro-6000", "27b", "4bit"): Fit("runs", f"the tutorial's batch 1, 0.7 samples/s {_H200_85}"),
    ("nvidia-rtx-pro-6000", "4b", "bf16"): Fit("runs", f"batch 27, 59.9 samples/s {_H200_85}"),
    ("nvidia-rtx-pro-6000", "4b", "int8"): Fit(
        "runs", "estimated: its weights (5.0 GiB) are smaller than bf16's, which fit at batch 27", False
    ),
    ("nvidia-rtx-pro-6000", "4b", "fp8"): Fit("runs", f"batch 32, 69.0 samples/s {_H200_85}"),
    ("nvidia-rtx-pro-6000", "4b", "4bit"): Fit("runs", f"the tutorial's batch 1, 1.6 samples/s {_H200_85}"),
    # L4: measured on the H200 within 22 GiB (speeds there are the H200's, several times an L4's). The
    # 22 GiB rows measured for issue 21 (bench/results/gpu.jsonl, docs/benchmarks.md) replace the
    # estimates below as they come in.
    ("nvidia-l4", "27b", "bf16"): Fit("no", "its weights alone take 51.1 GiB"),
    ("nvidia-l4", "27b", "int8"): Fit("no", "its weights alone take 27.3 GiB"),
    ("nvidia-l4", "27b", "fp8"): Fit("no", "its weights alone take 27.3 GiB"),
    # Trains at batch 1 with every layer checkpointed and features/scoring 4 images at a time; an L4 has
    # about an eighth of the H200's bf16 rate (docs/benchmarks.md, "22 GiB, an L4's budget").
    ("nvidia-l4", "27b", "4bit"): Fit(
        "slow",
        f"batch 1, every layer checkpointed, 0.63 samples/s {_H200_22} (gpu-call29), so about 0.08 on an "
        "L4: 13 hours or more per epoch of 3,680 images",
    ),
    # Issue 21's run did not record its weights: bf16 is inferred from its plan (batch 8 needs 15 layers
    # checkpointed with bf16's 8.0 GiB of weights and 2.5 GiB per sample; fp8's would fit without).
    ("nvidia-l4", "4b", "bf16"): Fit(
        "runs", f"batch 8, 15 layers checkpointed, 18.0 GiB at the peak {_H200_22} (issue 21)"
    ),
    ("nvidia-l4", "4b", "int8"): Fit("runs", _SMALLER, False),
    ("nvidia-l4", "4b", "fp8"): Fit("runs", _SMALLER, False),
    ("nvidia-l4", "4b", "4bit"): Fit("runs", _SMALLER, False),
}

_SIZE = re.compile(r"gemma-?3-(\d+b)\b", re.IGNORECASE)


def serves(gpu: str) -> bool:
    """Whether the image's torch runs on the GPU's driver."""
    return IMAGE_CUDA[gpu] <= GPUS[gpu].cuda


def identify(model: str) -> Model | None:
    """The Gemma 3 size a Hub id, bucket path or local directory holds: by its name, else by the config of
    a local directory; None when neither tells."""
    match = _SIZE.search(Path(model).name)
    if match and match[1].lower() in MODELS:
        return MODELS[match[1].lower()]
    config = Path(model).expanduser() / "config.json"
    try:
        text = json.loads(config.read_text()).get("text_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    shape = (text.get("hidden_size"), text.get("num_hidden_layers"))
    return next((found for found in MODELS.values() if found.text_shape == shape), None)


def default_model(gpu: str) -> str:
    """The Hub id of the largest model that runs on the GPU at full speed (DEFAULT_MODEL without one)."""
    for size, model in MODELS.items():
        if gpu not in GPUS or _fit(gpu, size, "auto").verdict == "runs":
            return model.hub_id
    return MODELS[DEFAULT_MODEL].hub_id


def why_default(gpu: str) -> str | None:
    """Why the GPU's default model is not DEFAULT_MODEL's, for `up` to say; None when it is."""
    usual = MODELS[DEFAULT_MODEL]
    chosen = default_model(gpu)
    if chosen == usual.hub_id:
        return None
    slow = _fit(gpu, DEFAULT_MODEL, "auto").verdict == "slow"
    reason = "runs only slowly there" if slow else "does not fit its memory"
    return f"model {chosen}, the default on an {GPUS[gpu].name}: {usual.name} {reason}."


def weights_for(gpu: str, size: str, quantization: str) -> str:
    """The trainer's name for the base weights --quantization gives on the GPU."""
    if quantization == "auto":
        return AUTO[(gpu, size)]
    return "bf16" if quantization == "none" else quantization


def _fit(gpu: str, size: str, quantization: str) -> Fit:
    return FITS[(gpu, size, weights_for(gpu, size, quantization))]


def check(gpu: str, model: str, quantization: str = "auto", command: str = "up") -> str | None:
    """Refuse a GPU the image cannot use, or a model (in these weights) its memory cannot hold, with a
    UserError naming what runs instead; return a line to show for one that runs slowly or was not
    measured; None when there is nothing to say (or nothing known: no GPU, a model not in the table)."""
    found = GPUS.get(gpu)
    if found is None:
        return None
    if not serves(gpu):
        served = [name for name in GPUS if serves(name)]
        others = ", or ".join(f"--gpu {name} (driver {GPUS[name].driver})" for name in served)
        raise UserError(
            f"The image cannot use Cloud Run's {found.name}: its torch {IMAGE_TORCH} is built for CUDA "
            f"{IMAGE_CUDA[gpu]}, which needs NVIDIA driver 580 or newer, and Cloud Run runs the {found.name} "
            f"with driver {found.driver} (CUDA {found.cuda}) (docs/container.md).",
            _how(command, f"Use {others}, or --gpu none to rehearse the job on CPU."),
        )
    size = next((key for key, value in MODELS.items() if value == identify(model)), None)
    if size is None or quantization not in ("auto", "none", "bf16", "int8", "fp8", "4bit"):
        return None
    weights = weights_for(gpu, size, quantization)
    fit = FITS[(gpu, size, weights)]
    name = MODELS[size].name
    chosen = f"in {weights}" + (" (--quantization auto)" if quantization == "auto" else "")
    if fit.verdict == "no":
        raise UserError(
            f"{name} does not fit an {found.name} ({found.gigabytes} GB) {chosen}: {fit.why} "
            "(docs/benchmarks.md).",
            _how(command, _alternatives(gpu, size)),
        )
    if fit.verdict == "slow":
        return f"{name} {chosen} runs slowly on an {found.name}: {fit.why}."
    if not fit.measured:
        return f"{name} {chosen} on an {found.name} was not measured; {fit.why}."
    return None


def _alternatives(gpu: str, size: str) -> str:
    """What runs instead: this model on another GPU, in other weights here, or a smaller model here."""
    name, here = MODELS[size].name, GPUS[gpu].name
    elsewhere = [
        f"the {GPUS[other].name} (--gpu {other})"
        for other in GPUS
        if other != gpu and serves(other) and _fit(other, size, "auto").verdict != "no"
    ]
    options = [f"{name} needs " + " or ".join(elsewhere)] if elsewhere else []
    options += [
        f"on an {here} it runs in {weights} (run --set quantization={weights}, or [trainer] quantization in "
        "gemma-launch.toml)"
        for (on, of, weights), fit in FITS.items()
        if (on, of) == (gpu, size) and fit.verdict != "no"
    ]
    options += [
        f"on an {here} use --model-id {model.hub_id}"
        for key, model in MODELS.items()
        if key != size and _fit(gpu, key, "auto").verdict != "no"
    ][:1]
    return "; ".join(options) + "."


def _how(command: str, hint: str) -> str:
    """`run` cannot change the job's GPU or model: `up` makes the job anew."""
    if command == "run":
        return f"The job was made for this combination; make it anew with `gemma-launch up`. {hint}"
    return hint
