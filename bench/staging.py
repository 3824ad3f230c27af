"""Staging benchmark: a 2 GB synthetic model repo into a bucket, the reference way against gemma-launch's.

reference  huggingface_hub.snapshot_download to a local directory (8 parallel downloads, its default),
           then each file uploaded to the bucket one after the other (blob.upload_from_filename), as the
           tutorial does with `hf download` followed by a copy to the bucket.
staging    launcher.staging: Hub files streamed straight into resumable uploads, 8 files at once, each
           verified against its sha256 and the bucket's crc32c, nothing written to local disk.

Both read the same repo from the tests' Hub stand-in (run in its own process) and write into a fresh
storage emulator (`gemma-launch emulator start`, its own process) per approach; both results are checked
byte for byte (sha256 of every object) after the timed part. Timings are wall-clock on this machine.

    .venv/bin/python bench/staging.py [--gigabytes 2] [--shards 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's launcher and tests.support (the Hub stand-in)

# huggingface_hub reads HF_ENDPOINT once, at import, so it and the launcher (which imports it) are
# imported only after the Hub stand-in is up and HF_ENDPOINT points at it.

REPO = "bench/synthetic-gemma"
TOKEN = "hf_BenchToken0123456789abcdefghijk"
PROJECT = "bench-project"
BUCKET = "bench-project-staging"


def synthetic_repo(gigabytes: float, shards: int) -> dict[str, bytes]:
    shard_size = int(gigabytes * 1e9) // shards
    files = {
        "config.json": json.dumps({"model_type": "gemma3", "hidden_size": 5376}).encode(),
        "tokenizer.json": random.Random(0).randbytes(33_000_000),
        "model.safetensors.index.json": json.dumps({"weight_map": {}}).encode(),
    }
    for index in range(1, shards + 1):
        files[f"model-{index:05d}-of-{shards:05d}.safetensors"] = random.Random(index).randbytes(shard_size)
    return files


def serve_hub(gigabytes: float, shards: int) -> None:
    """Child process: publish the repo on a Hub stand-in, print its endpoint and manifest, serve."""
    from tests.support.hub_standin import HubStandin

    files = synthetic_repo(gigabytes, shards)
    with HubStandin(tokens={TOKEN}) as hub:
        hub.add_repo(REPO, files)
        manifest = {
            path: [len(content), hashlib.sha256(content).hexdigest()] for path, content in files.items()
        }
        print(json.dumps({"endpoint": hub.endpoint, "files": manifest}), flush=True)
        sys.stdin.read()  # until the parent closes our stdin


class Emulator:
    """A `gemma-launch emulator start` process with its own data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "gemma-launch"), "emulator", "start", "--data-dir", str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        for _ in range(2):
            name, value = self.process.stdout.readline().removeprefix("export ").strip().split("=", 1)
            os.environ[name] = value

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)

    def bucket_dir(self) -> Path:
        return self.data_dir / "storage" / ".cloudstorage" / BUCKET


def reference(work: Path) -> None:
    from huggingface_hub import snapshot_download

    from launcher.cloud import Clients

    local_dir = work / "download"
    snapshot_download(REPO, local_dir=local_dir, token=TOKEN)
    bucket = Clients(PROJECT).storage.bucket(BUCKET)
    for path in sorted(local_dir.rglob("*")):
        relative = path.relative_to(local_dir).as_posix()
        if path.is_file() and not relative.startswith(".cache/"):
            bucket.blob(f"{REPO}/{relative}").upload_from_filename(str(path))


def ours(work: Path) -> None:
    from launcher import staging
    from launcher.cloud import Clients

    client = Clients(PROJECT).storage
    source = staging.resolve_source("model", REPO, None, TOKEN)
    staging.stage_source(client, client.bucket(BUCKET), source)


def measure(name: str, approach: Callable[[Path], None], manifest: dict[str, list]) -> float:
    size = sum(entry[0] for entry in manifest.values())
    from launcher.cloud import Clients

    with tempfile.TemporaryDirectory(prefix=f"bench-staging-{name}-") as work:
        emulator = Emulator(Path(work) / "emulator")
        try:
            Clients(PROJECT).storage.create_bucket(BUCKET, location="europe-west4")
            started = time.perf_counter()
            approach(Path(work))
            seconds = time.perf_counter() - started
            staged = emulator.bucket_dir() / REPO
            for path, (_, sha256) in manifest.items():
                with (staged / path).open("rb") as content:
                    assert hashlib.file_digest(content, "sha256").hexdigest() == sha256, f"{name}: {path}"
        finally:
            emulator.stop()
    print(f"{name:<10} {seconds:7.1f} s  {size / seconds / 1e6:7.1f} MB/s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--serve-hub", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve_hub:
        serve_hub(options.gigabytes, options.shards)
        return

    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="bench-staging-hf-")
    hub = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve-hub",
            "--gigabytes",
            str(options.gigabytes),
            "--shards",
            str(options.shards),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hub.stdout is not None
        published = json.loads(hub.stdout.readline())
        manifest = published["files"]
        os.environ["HF_ENDPOINT"] = published["endpoint"]
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        size = sum(entry[0] for entry in manifest.values())
        print(f"repo {REPO}: {len(manifest)} files, {size / 1e9:.2f} GB; {os.cpu_count()} CPUs", flush=True)
        timings = {
            name: measure(name, approach, manifest)
            for name, approach in (("reference", reference), ("staging", ours))
        }
        print(f"speed-up  {timings['reference'] / timings['staging']:.2f}x", flush=True)
    finally:
        assert hub.stdin is not None
        hub.stdin.close()
        hub.wait(timeout=60)


if __name__ == "__main__":
    main()
