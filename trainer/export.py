"""Outputs: adapter + processor, optional merged model, results.json, upload to GCS."""

import argparse
import json
import logging
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

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


def merge(model_id: str, adapter_dir: Path, out_dir: Path, device: str, token: str | None) -> None:
    """Fold the adapter into the base weights: a plain Gemma 3 checkpoint that needs no peft.

    A quantized (4-bit, int8) base is reloaded in bf16 first: merging into it would round the update away.
    """
    base = load_base_model(model_id, "fp32" if device == "cpu" else "bf16", device, token)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
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
