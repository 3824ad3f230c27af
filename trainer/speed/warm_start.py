"""A warm start: what a process of the job reuses from its earlier processes (other executions, other
attempts of a task), through a directory they share under --output-dir (the bucket's mount on Cloud Run):
torch.compile's cache artifacts and the training memory plan.

    <output-dir>/.cache/warm-start/<key>/key.json          what the key covers, readable
    <output-dir>/.cache/warm-start/<key>/artifacts.bin     torch.compiler.save_cache_artifacts()
    <output-dir>/.cache/warm-start/<key>/plan-<request>.json   a memory plan and the request it answers

The key covers what makes either unusable elsewhere: torch, triton, transformers and peft, the trainer's own
code (a new image starts cold once), the GPU and its compute capability, the model's config, the base
weights' precision, LoRA's r, alpha and dropout, and whether layers compile.
Inductor also keys each graph by its content, so an artifact that other code made only misses. Reading is
best effort: a missing, corrupt or foreign file logs a warning, and the run compiles or probes as usual.
Files are written whole and renamed into place, so a task stopped mid-write leaves the previous file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import peft
import torch
import transformers
from transformers import PreTrainedModel, TrainerCallback

from trainer.speed.memory import Plan

log = logging.getLogger(__name__)

# The job's cache under --output-dir, which uploads of a run's outputs leave out.
CACHE = Path(".cache")
ROOT = CACHE / "warm-start"
ARTIFACTS = "artifacts.bin"


def digest(document: object) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_device(device: str) -> str:
    """The GPU's name and compute capability (what Triton's kernels are built for), or cpu."""
    if device == "cpu":
        return "cpu"
    index = torch.device(device).index
    properties = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return f"{properties.name} sm_{properties.major}{properties.minor}"


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def code_identity() -> str:
    """A digest of the trainer package's source: its layers and memory use change with it."""
    package = Path(__file__).resolve().parents[1]
    sources = sorted(package.rglob("*.py"))
    return digest(
        {str(path.relative_to(package)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sources}
    )


def model_identity(model: PreTrainedModel) -> str:
    """A digest of the model's config, less where it was loaded from and the writer's version."""
    config = model.config.to_dict()
    return digest({name: value for name, value in config.items() if not name.startswith("_")})


class WarmStart:
    """The shared directory of one key, or nothing (directory None: --no-compile-cache).

    `compile_cache` says what happened to the artifacts ("off", "none yet", "loaded", "ignored"), `saved`
    whether this process wrote them, `plan_source` where the training plan came from (build_trainer).
    """

    def __init__(self, directory: Path | None, key: dict | None = None, compiled: bool = False) -> None:
        self.directory = directory
        self.key = key or {}
        self.compiled = compiled and directory is not None
        self.compile_cache = "off"
        self.saved = False
        self.plan_source: str | None = None
        # Artifacts the file already holds (loaded, or written by this process): a save with no others
        # leaves the file as it is.
        self.known: set[str] = set()

    @classmethod
    def open(
        cls,
        output_dir: str | Path,
        enabled: bool,
        model: PreTrainedModel,
        precision: str,
        device: str,
        lora: tuple[int, int, float],
        compiled: bool,
    ) -> WarmStart:
        if not enabled:
            return cls(None)
        key = {
            "torch": torch.__version__,
            "triton": triton_version(),
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trainer": code_identity(),
            "device": describe_device(device),
            "model": model_identity(model),
            "precision": precision,
            "lora_r_alpha_dropout": list(lora),
            "compile": "layers" if compiled else "off",
        }
        return cls(Path(output_dir) / ROOT / digest(key), key, compiled)

    def load_artifacts(self) -> None:
        """Hand the stored artifacts to torch.compile's caches; call before anything compiles."""
        if not self.compiled:
            return
        path = self.directory / ARTIFACTS
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.compile_cache = "none yet"
            log.info("compile cache: none yet in %s (key %s)", self.directory, self.directory.name)
            return
        except OSError as error:
            self._ignore(path, error)
            return
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as error:  # noqa: BLE001 - whatever a foreign file raises, compiling still works
            self._ignore(path, error)
            return
        if info is None:  # torch logs its own warning and loads nothing
            self._ignore(path, "torch could not read it")
            return
        self.known = artifact_keys(info)
        self.compile_cache = "loaded"
        log.info("compile cache: loaded %d bytes from %s (key %s)", len(data), path, self.directory.name)

    def save_artifacts(self) -> None:
        """Write what torch.compile has compiled or loaded so far, when it holds graphs the file lacks."""
        if not self.compiled:
            return
        # Timed for the log: the save runs inside a step, and a cold start's first step also compiles.
        start = time.perf_counter()
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        data, info = saved
        keys = artifact_keys(info)
        if keys <= self.known:
            return
        try:
            self._write(ARTIFACTS, data)
        except OSError as error:
            log.warning("compile cache: could not save to %s: %s", self.directory, error)
            return
        self.known, self.saved = keys, True
        log.info(
            "compile cache: saved %d bytes to %s in %.1f s (key %s)",
            len(data),
            self.directory / ARTIFACTS,
            time.perf_counter() - start,
            self.directory.name,
        )

    def plan(self, request: dict) -> Plan | None:
        """The plan stored for `request` (budget, batch and checkpointing asked, sequence length), if any."""
        if self.directory is None:
            return None
        path = self._plan_path(request)
        try:
            document = json.loads(path.read_text())
            if document["request"] != request:
                raise ValueError("another request")
            return Plan(**document["plan"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("memory plan: ignoring %s (%s); planning as usual", path, error)
            return None

    def keep_plan(self, request: dict, plan: Plan) -> None:
        if self.directory is None:
            return
        document = {"request": request, "plan": dataclasses.asdict(plan)}
        try:
            self._write(self._plan_path(request).name, (json.dumps(document, indent=1) + "\n").encode())
        except OSError as error:
            log.warning("memory plan: could not store it in %s: %s", self.directory, error)

    def drop_plans(self) -> None:
        """Forget every stored plan of this key: training ran out of memory with one."""
        if self.directory is None:
            return
        for path in self.directory.glob("plan-*.json"):
            path.unlink(missing_ok=True)
            log.info("memory plan: dropped %s, the next execution measures again", path)

    def callback(self) -> TrainerCallback:
        """Saves the artifacts once this process's first training step has compiled the training graphs."""
        return _SaveAfterFirstStep(self)

    def record(self) -> dict:
        """results.json's "warm_start"."""
        return {
            "compile_cache": self.compile_cache,
            "compile_cache_saved": self.saved,
            "plan": self.plan_source,
        }

    def _plan_path(self, request: dict) -> Path:
        return self.directory / f"plan-{digest(request)}.json"

    def _write(self, name: str, data: bytes) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory / "key.json"
        if not key.exists():
            _replace(key, (json.dumps(self.key, indent=1) + "\n").encode())
        _replace(self.directory / name, data)

    def _ignore(self, path: Path, problem: object) -> None:
        self.compile_cache = "ignored"
        log.warning("compile cache: ignoring %s (%s); compiling as usual", path, problem)


class _SaveAfterFirstStep(TrainerCallback):
    def __init__(self, warm: WarmStart) -> None:
        self.warm, self.done = warm, False

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if not self.done:
            self.done = True
            self.warm.save_artifacts()


def artifact_keys(info: object) -> set[str]:
    return {f"{kind}/{key}" for kind, keys in info.artifacts.items() for key in keys}


def _replace(path: Path, data: bytes) -> None:
    # Unique: a sweep's tasks share the directory, and each container's trainer may be PID 1.
    partial = path.with_name(f"{path.name}.partial-{os.urandom(6).hex()}")
    partial.write_bytes(data)
    os.replace(partial, path)
