"""Outputs: adapter + processor, optional merged model, results.json, upload to GCS."""

import argparse
import gc
import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from trainer.modeling import load_base_model, load_processor

log = logging.getLogger(__name__)

VERSIONED = ["torch", "transformers", "trl", "peft", "datasets", "accelerate", "scikit-learn", "bitsandbytes"]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in VERSIONED:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


# Shards of the merged checkpoint. save_pretrained gathers each shard in host memory before writing it
# (transformers' default is 50GB: the 27B's 51 GiB in one piece); small ones also suit the bucket mount.
MERGED_SHARD_SIZE = "2GB"


def free_memory(device: str) -> None:
    """Release what nothing references any more, on the host and on the GPU, and compiled graphs."""
    # Compiled layers' code caches hold the modules they were compiled for.
    torch._dynamo.reset()
    gc.collect()  # the model, PEFT's hooks and the trainer reference one another
    if device == "cuda":
        torch.cuda.empty_cache()
        log.info(
            "GPU memory in use after freeing the training state: %.1f GiB",
            torch.cuda.memory_allocated() / 2**30,
        )


def merge(model_id: str, adapter_dir: Path, out_dir: Path, device: str, token: str | None) -> None:
    """Fold the adapter into the base weights: a plain Gemma 3 checkpoint that needs no peft.

    A quantized (fp8, int8, 4-bit) base is reloaded in bf16 first: merging into it would round the update
    away. The caller must hold no reference to the training state (model, trainer, optimizer, image
    features): it is freed here first, since the 27B's bf16 weights (51 GiB) do not fit beside it.
    """
    free_memory(device)
    base = load_base_model(model_id, "fp32" if device == "cpu" else "bf16", device, token)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, max_shard_size=MERGED_SHARD_SIZE)
    load_processor(model_id, token).save_pretrained(out_dir)
    log.info("merged model written to %s", out_dir)


def run_settings(args: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """Every flag of the run as `python -m trainer` received it (the token aside), and what its `auto`
    values became (`resolved`): what two runs' results.json need to be compared."""
    flags = {name.replace("_", "-"): value for name, value in vars(args).items() if name != "hf_token"}
    flags["batch-size"] = args.batch_size or "auto"  # the parser turns auto into None
    return {"flags": flags, "resolved": resolved}


def write_results(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def upload(root: Path, files: list[Path], gcs_path: str) -> None:
    """Upload root/<file> to <gcs_path>/<file> in parallel; the client honours STORAGE_EMULATOR_HOST."""
    # Imported here: only runs that upload need the client (the GPU benchmarks' machine has none).
    from google.cloud import storage
    from google.cloud.storage import transfer_manager

    bucket_name, _, prefix = gcs_path.removeprefix("gs://").partition("/")
    prefix = prefix.strip("/")
    bucket = storage.Client().bucket(bucket_name)
    names = [str(file) for file in files]
    transfer_manager.upload_many_from_filenames(
        bucket,
        names,
        source_directory=str(root),
        blob_name_prefix=f"{prefix}/" if prefix else "",
        raise_exception=True,
        worker_type=transfer_manager.THREAD,
    )
    log.info("uploaded %d files to %s", len(names), gcs_path)
