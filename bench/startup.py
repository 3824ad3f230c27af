"""The trainer's start-up as a Cloud Run task runs it, on a GPU: compile, the 27B load, a retried attempt.

    python bench/startup.py --out OUT                 # GPU: 27B (4B if the disk cannot hold 27B)
    python bench/startup.py --smoke --out OUT         # CPU, tiny model: every step, in a minute

1. Where each package the trainer imports was loaded from, and whether its version is requirements.lock's
   (OUT/environment.json): on the GPU machine the lock's wheels sit in a --target directory first on
   PYTHONPATH, over the machine's own torch.
2. The tiny model end to end through `python -m trainer --compile on` (OUT/tiny-compile.log).
3. A random-init Gemma 3 checkpoint as the Hub lays it out: bf16 safetensors in 5 GB shards with their
   index, config, tokenizer and processor. Then the page cache is dropped, so the first load reads the disk.
4. `python -m trainer` on it as task attempt 0 (CLOUD_RUN_TASK_ATTEMPT=0): load, image features, baseline
   evaluation, memory plan, a few steps, then SIGTERM, as Cloud Run sends it: a checkpoint, exit 143.
5. Attempt 1 on the same run directory: what it reused and its time to the first step (then SIGTERM
   again, unless --attempt1-to-end).

Times come from the trainer's own log lines, stamped by this script with the seconds since it started the
process. One JSON object per measurement goes to OUT/startup.jsonl; each run's log to OUT/*.log.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# The tests' tiny-model run (tests/trainer/conftest.py TRAIN_FLAGS), on the GPU, with the trainer's default
# evaluation (scoring) only: generation compiles graphs of its own, a minute more under contention.
TINY_FLAGS = [
    "--train-size", "740", "--eval-size", "222", "--num-epochs", "5", "--learning-rate", "2e-2",
    "--batch-size", "16", "--eval-batch-size", "32", "--save-steps", "50", "--logging-steps", "10",
    "--eval-method", "score", "--seed", "0",
]  # fmt: skip
# The Hub's Gemma 3 checkpoints come in shards of about 5 GB (gemma-3-27b-it: 12 files).
SHARD_SIZE = "5GB"
# What each log line marks, in the order an attempt reaches them.
MARKERS = {
    "platform": "torch ",
    "model_loaded": "model loaded in",
    "features": "image features of",
    "baseline": "baseline evaluation of",
    "baseline_reused": "baseline predictions of an earlier attempt",
    "plan": "memory plan for",
    "plan_reused": "the plan of an earlier attempt",
    "resume": "task attempt",
    "stopped": "stopped by SIGTERM",
    "done": "done: outputs in",
}
STEP = re.compile(r" step (\d+)/(\d+) ")
# The trainer's own timings: "model loaded in 41.3 s", "image features of 185 images in 6.2 s", ...
DURATION = re.compile(
    r"INFO (model loaded|image features|baseline evaluation)(?: of \d+ images)? in ([\d.]+) s"
)


def environment(out: Path) -> dict:
    """Each distribution the trainer's imports reach: its version, where it loads from, the lock's version."""
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
        if match:
            lock[canonical(match.group(1))] = match.group(2)
    rows = {}
    for dist in importlib.metadata.distributions():
        name = canonical(dist.metadata["Name"])
        if name in lock or name.startswith(("torch", "triton", "nvidia", "cuda")):
            location = str(Path(str(dist.locate_file(""))).resolve())
            if name not in rows:  # the first on sys.path is the one imported
                rows[name] = {"version": dist.version, "lock": lock.get(name), "location": location}
    site = os.environ.get("PYTHONPATH", "").split(":")[0]
    for row in rows.values():
        row["from"] = "lock" if site and row["location"].startswith(str(Path(site).resolve())) else "machine"
    (out / "environment.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    for origin in ("lock", "machine"):
        names = sorted(f"{n} {r['version']}" for n, r in rows.items() if r["from"] == origin)
        print(f"ENV from {origin} ({len(names)}): {', '.join(names)}", flush=True)
    differ = sorted(
        f"{name} {row['version']} (lock {row['lock']})"
        for name, row in rows.items()
        if row["lock"] and row["version"] != row["lock"]
    )
    print(f"ENV not the lock's version: {', '.join(differ) or 'none'}", flush=True)
    return rows


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class TrainerRun:
    """`python -m trainer ARGS` in its own process, its output stamped and scanned as it comes."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], out: Path) -> None:
        self.name, self.log_path = name, out / f"{name}.log"
        self.markers: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.steps: list[tuple[int, float]] = []
        self.lines: list[str] = []
        self.stop_at: int | None = None
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer", *args],
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                elapsed = time.perf_counter() - self.start
                log.write(f"[{elapsed:7.1f}s] {line}")
                log.flush()
                self.lines.append(line.rstrip())
                for key, text in MARKERS.items():
                    if key not in self.markers and text in line:
                        self.markers[key] = round(elapsed, 1)
                duration = DURATION.search(line)
                if duration:
                    self.durations[duration.group(1).replace(" ", "_")] = float(duration.group(2))
                step = STEP.search(line)
                if step:
                    self.steps.append((int(step.group(1)), round(elapsed, 1)))
                    if self.stop_at is not None and int(step.group(1)) >= self.stop_at:
                        self.process.send_signal(signal.SIGTERM)  # as Cloud Run does before stopping a task
                        self.stop_at = None

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = None
        self.reader.join(timeout=10)
        return code

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def record(out: Path, row: dict) -> None:
    row = {"date": datetime.date.today().isoformat(), **row}
    print("RESULT " + json.dumps(row), flush=True)
    with (out / "startup.jsonl").open("a") as file:
        file.write(json.dumps(row) + "\n")


def gpu_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def write_checkpoint(arch: str, path: Path, device: str) -> dict:
    """Random-init Gemma 3 from the published config, saved as the Hub lays it out; returns what it wrote."""
    import torch
    from gpu_throughput import build_model, build_processor

    from trainer.offline.tiny import build

    start = time.perf_counter()
    if arch == "tiny":
        build(path)
    else:
        processor = build_processor(896, 256)
        model = build_model(arch, processor, device)
        built = time.perf_counter() - start
        model.save_pretrained(path, max_shard_size=SHARD_SIZE)
        processor.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
        print(f"checkpoint: built in {built:.1f} s, written in {time.perf_counter() - start - built:.1f} s")
    subprocess.run(["sync"], check=False)
    shards = sorted(path.glob("*.safetensors"))
    return {
        "write_s": round(time.perf_counter() - start, 1),
        "shards": len(shards),
        "bytes": sum(shard.stat().st_size for shard in shards),
    }


def drop_page_cache() -> bool:
    """So the next read of the checkpoint comes from the disk, as a task's first read of the mount does."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as error:
        print(f"page cache not dropped ({error}): the load below may read from memory", flush=True)
        return False


def finish_tiny(tiny: TrainerRun, work: Path, out: Path, device: str, timeout: float, compiled: bool) -> None:
    """Wait for the tiny run (at most `timeout` s) and record how it ended."""
    code = tiny.wait(timeout)
    results = work / "tiny-run" / "results.json"
    summary = json.loads(results.read_text()) if code == 0 and results.is_file() else {}
    record(
        out,
        {
            "measure": f"tiny model, compile {'on' if compiled else 'off'}",
            "gpu": gpu_name(device),
            "exit_code": code,
            "seconds": tiny.seconds(),
            "inductor_cache_files": sum(1 for p in (work / "inductor-cache").rglob("*") if p.is_file()),
            "by_method": summary.get("by_method"),
            "settings": (summary.get("settings") or {}).get("resolved"),
            "versions": summary.get("versions"),
            "tail": tiny.lines[-3:] if code else [],
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", choices=["27b", "4b"], default="27b")
    parser.add_argument("--work", type=Path, help="where the checkpoint and runs go (default: a temp dir)")
    parser.add_argument("--stop-at-step", type=int, default=3, help="attempt 0 gets SIGTERM after this step")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole script")
    parser.add_argument("--attempt1-to-end", action="store_true", help="else SIGTERM after its first step")
    parser.add_argument(
        "--attempt0-flags",
        default="",
        help='trainer flags for attempt 0 only, e.g. "--batch-size 13 --gradient-checkpointing off" (a plan '
        "measured before): no memory probes, when only attempt 1 is to be timed",
    )
    parser.add_argument(
        "--keep-page-cache", action="store_true", help="attempt 0 reads the new checkpoint from memory"
    )
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, compile off")
    bench = parser.parse_args()
    began = time.perf_counter()
    bench.out.mkdir(parents=True, exist_ok=True)
    # The checkpoint needs the roomiest local disk there is.
    places = {tempfile.gettempdir(), str(Path.home()), str(REPO.parent)}
    roomiest = max(places, key=lambda place: disk_free(Path(place)))
    work = bench.work or Path(tempfile.mkdtemp(prefix="startup-", dir=roomiest))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if bench.smoke else "cuda"
    environment(bench.out)
    from trainer.offline.synthetic import write_dataset

    # The tests' tiny run with compile on; alongside the checkpoint's writing, which is disk-bound.
    tiny = None
    if not bench.skip_tiny:
        build_tiny = [sys.executable, "-m", "trainer.offline.tiny", str(work / "tiny")]
        subprocess.run(build_tiny, cwd=REPO, check=True, capture_output=True)
        write_dataset(work / "tiny-pets", per_class=20, test_per_class=6)
        inductor = work / "inductor-cache"
        tiny = TrainerRun(
            "tiny-compile",
            [
                "--model-id",
                str(work / "tiny"),
                "--dataset",
                str(work / "tiny-pets"),
                "--device",
                device,
                "--compile",
                "off" if bench.smoke else "on",
                "--output-dir",
                str(work / "tiny-run"),
                *TINY_FLAGS,
            ],
            {"TORCHINDUCTOR_CACHE_DIR": str(inductor), "TRITON_CACHE_DIR": str(work / "triton-cache")},
            bench.out,
        )

    arch = "tiny" if bench.smoke else bench.arch
    place = work
    medium = "memory (/dev/shm)" if str(work.resolve()).startswith("/dev/shm") else "disk"
    if arch == "27b" and disk_free(work) < 60e9:
        # 55 GB do not fit the disk: /dev/shm (memory) still shows what an attempt reuses and its compile
        # and plan; the read itself is then memory's, not a disk's.
        print(f"{disk_free(work) / 1e9:.0f} GB free under {work}: 27B needs 55", flush=True)
        if disk_free(Path("/dev/shm")) >= 60e9:
            place, medium = Path(tempfile.mkdtemp(prefix="startup-", dir="/dev/shm")), "memory (/dev/shm)"
        else:
            arch = "4b"
    checkpoint = place / f"gemma-3-{arch}"
    written = write_checkpoint(arch, checkpoint, device)
    print(f"CHECKPOINT {arch}: {written}", flush=True)

    pets = work / "pets"
    write_dataset(pets, per_class=4, test_per_class=1)
    cold = not bench.keep_page_cache and drop_page_cache()
    flags = [
        "--model-id",
        str(checkpoint),
        "--dataset",
        str(pets),
        "--device",
        device,
        "--output-dir",
        str(work / "runs"),
        "--train-size",
        "148",
        "--eval-size",
        "37",
        "--logging-steps",
        "1",
        "--save-steps",
        "1000",
        "--seed",
        "0",
        "--num-epochs",
        "10" if bench.smoke else "1",
    ]
    if bench.smoke:
        flags += ["--compile", "off"]
    execution = {"CLOUD_RUN_EXECUTION": "restart"}
    attempts = []
    for attempt in (0, 1):
        if attempt == 1 and tiny is not None:
            # It ran alongside the checkpoint's writing and attempt 0 (time attempt 0 with --skip-tiny);
            # attempt 1, the retry whose cost is the question, runs alone.
            finish_tiny(tiny, work, bench.out, device, bench.deadline - (time.perf_counter() - began) - 110,
                        not bench.smoke)  # fmt: skip
            tiny = None
        left = bench.deadline - (time.perf_counter() - began)
        if left < 60:
            print(f"attempt {attempt} not run: {left:.0f} s left of --deadline", flush=True)
            break
        # Empty compile caches, as in the fresh container that a retried task may get.
        caches = {
            "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-cache-{attempt}"),
            "TRITON_CACHE_DIR": str(work / f"triton-cache-{attempt}"),
        }
        env = {**execution, **caches, "CLOUD_RUN_TASK_ATTEMPT": str(attempt)}
        extra = bench.attempt0_flags.split() if attempt == 0 else []
        run = TrainerRun(f"{arch}-attempt{attempt}", flags + extra, env, bench.out)
        if attempt == 0:
            run.stop_at = bench.stop_at_step
        elif not bench.attempt1_to_end:
            run.stop_at = 0  # its time to the first step is what a retry costs
        code = run.wait(left - 10)
        state_file = work / "runs" / "restart" / "run_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        first = run.steps[0] if run.steps else (None, None)
        row = {
            "measure": f"task attempt {attempt}",
            "arch": arch,
            "gpu": gpu_name(device),
            "checkpoint_read": medium
            if medium != "disk"
            else ("disk (page cache dropped)" if attempt == 0 and cold else "page cache"),
            "exit_code": code,
            "seconds": run.seconds(),
            "first_step": first[0],
            "first_step_s": first[1],
            "markers_s": run.markers,
            "durations_s": run.durations,
            "reused": {
                "baseline": "baseline_reused" in run.markers,
                "plan": "plan_reused" in run.markers,
                "checkpoint": next(
                    (line.split("resuming from ")[1] for line in run.lines if "resuming from" in line), None
                ),
            },
            "plan": state.get("plan"),
            "steps_logged": len(run.steps),
            "tail": run.lines[-3:] if code not in (0, 143) else [],
        }
        if attempt == 0:
            row.update(checkpoint_written=written, checkpoint_cold=cold, extra_flags=bench.attempt0_flags)
        attempts.append(row)
        record(bench.out, row)
        if code not in (0, 128 + signal.SIGTERM):
            break

    if tiny is not None:  # attempt 0 failed or time ran out
        finish_tiny(
            tiny, work, bench.out, device, bench.deadline - (time.perf_counter() - began), not bench.smoke
        )
    print("\nSUMMARY", flush=True)
    for row in attempts:
        marks = row["markers_s"]
        print(
            f"{row['measure']:>16} ({row['arch']}, {row['checkpoint_read']}): exit {row['exit_code']}, "
            f"loaded at {marks.get('model_loaded')} s, features {marks.get('features')} s, baseline "
            f"{marks.get('baseline', 'reused' if row['reused']['baseline'] else None)} s, plan "
            f"{marks.get('plan', 'reused' if row['reused']['plan'] else None)} s, first step "
            f"{row['first_step']} at {row['first_step_s']} s, whole {row['seconds']} s",
            flush=True,
        )
    print(f"startup.py took {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
