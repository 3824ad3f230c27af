"""The reliability checks' helpers, shared by tests/reliability and bench/reliability.py: a small project
whose image runs a fake trainer, the user's flow under injected faults for one seed, and what the
emulator holds afterwards (duplicates, the HF token leaking anywhere)."""

from __future__ import annotations

import base64
import gzip
import json
import textwrap
import time
from collections import Counter
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from google.iam.v1 import iam_policy_pb2

from launcher.cli import main
from launcher.cloud import Clients
from launcher.emulator.record import read_record
from launcher.emulator.server import Emulator
from tests.support.emulator import emulated as support_emulated
from tests.support.image_source import image_source

PROJECT = "demo-project"
TOKEN = "hf_reliabilityCanary7Qx3Zp9Lm2Wv8Rt5"
SA = f"gemma3-finetuning@{PROJECT}.iam.gserviceaccount.com"
BUCKET = f"{PROJECT}-gemma3-finetuning"
SECRET = f"projects/{PROJECT}/secrets/HF_TOKEN"
JOB = f"projects/{PROJECT}/locations/europe-west4/jobs/gemma3-finetuning-job"

# The task's view of itself: argv as the kernel has it, and a digest of the token, never the token.
FAKE_TRAINER = textwrap.dedent(
    """
    import hashlib, json, os, pathlib, sys

    args = sys.argv[1:]
    flags = dict(zip(args[::2], args[1::2]))
    cmdline = pathlib.Path("/proc/self/cmdline").read_bytes().split(b"\\0")
    print("cmdline", json.dumps([part.decode() for part in cmdline if part]), flush=True)
    token = os.environ.get("HF_TOKEN", "")
    print("token-sha256", hashlib.sha256(token.encode()).hexdigest(), flush=True)
    execution = os.environ["CLOUD_RUN_EXECUTION"]
    output = pathlib.Path(flags["--output-dir"])
    run_dir = output / execution
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "model_id": flags["--model-id"], "dataset": flags["--dataset"], "train_size": 10, "eval_size": 5,
        "eval_method": "score", "execution": execution,
        "baseline": {"accuracy": 0.05, "macro_f1": 0.02, "unknown_rate": 0.0},
        "final": {"accuracy": 0.8, "macro_f1": 0.75, "unknown_rate": 0.0},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    (output / "LATEST").write_text(execution + "\\n")
    print("done", flush=True)
    """
)


def make_project(root: Path) -> Path:
    """A small source tree with a Dockerfile running the fake trainer, and a .env holding the token."""
    image_source(root, ["python", "fake_trainer.py"], {"fake_trainer.py": FAKE_TRAINER})
    # A user's local secrets file: the source archive must leave it out.
    (root / ".env").write_text(f"HF_TOKEN={TOKEN}\n")
    return root


def faults_spec(seed: int, unavailable: float = 0.3) -> str:
    return f"UNAVAILABLE={unavailable},DEADLINE_EXCEEDED=0.05,RESOURCE_EXHAUSTED=0.02,lost=0.1,seed={seed}"


def emulated(workdir: Path, faults: str | None = None) -> AbstractContextManager[Emulator]:
    """A fresh emulator recording to workdir/record.jsonl, with the environment pointing at it and the
    user's PROJECT_ID and HF_TOKEN set. A project whose GPU quota request was granted, as in the demo."""
    return support_emulated(
        workdir, env={"PROJECT_ID": PROJECT, "HF_TOKEN": TOKEN}, faults=faults, gpu_quota=1
    )


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def up_args(project: Path) -> list[str]:
    return ["up", "--skip-stage", "--source", str(project), "--max-retries", "1"]


# ---- what the emulator holds ----------------------------------------------------------------------


def duplicates(emulator: Emulator, executions_expected: int | None = None) -> list[str]:
    """Every resource that exists more than once, or a binding granted twice; [] when all is single."""
    state = emulator.state
    found = []
    accounts = [key for key in state.table("service_accounts") if SA in key]
    if len(accounts) != 1:
        found.append(f"{len(accounts)} service accounts")
    repositories = list(state.table("repositories"))
    if len(repositories) != 1:
        found.append(f"{len(repositories)} repositories")
    secrets = state.table("secrets")
    if len(secrets) != 1:
        found.append(f"{len(secrets)} secrets")
    for key, stored in secrets.items():
        # A version destroyed by the `up` that lost a race is gone for good; count the live ones.
        enabled = [v for v in stored["versions"].values() if v["version"].get("state") in (1, "ENABLED")]
        if len(enabled) != 1:
            found.append(f"{len(enabled)} enabled versions of {key}")
        bindings = (stored.get("policy") or {}).get("bindings", [])
        if sum(len(binding.get("members", [])) for binding in bindings) != 1:
            found.append(f"secret policy {bindings}")
    jobs = list(state.table("run_jobs"))
    if len(jobs) != 1:
        found.append(f"{len(jobs)} jobs")
    # A build cancelled by the `up` that lost a race did not build; count the others.
    tags = Counter(
        (build["build"].get("substitutions") or {}).get("_TAG")
        for build in state.table("builds").values()
        if build["status"] != "CANCELLED"
    )
    found += [f"{count} builds of tag {tag}" for tag, count in tags.items() if count != 1]
    if len(tags) != 1:
        found.append(f"{len(tags)} build tags")
    executions = list(state.table("run_executions"))
    if executions_expected is not None and len(executions) != executions_expected:
        found.append(f"{len(executions)} executions, expected {executions_expected}")
    buckets = [name for name in emulator._storage_server._storage.buckets if name == BUCKET]
    if len(buckets) != 1:
        found.append(f"{len(buckets)} buckets")
    policy = Clients(PROJECT).storage.bucket(BUCKET).get_iam_policy(requested_policy_version=3)
    granted = [(b["role"], member) for b in policy.bindings for member in b["members"] if SA in member]
    if granted != [("roles/storage.objectUser", f"serviceAccount:{SA}")]:
        found.append(f"bucket grants {granted}")
    return found


def token_forms(token: str) -> list[bytes]:
    """The token as bytes, and as it reads inside base64 at each of the three byte alignments."""
    forms = [token.encode()]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + token.encode())
        # Drop the characters that also depend on the neighbouring bytes.
        forms.append(encoded[(offset * 4 + 2) // 3 + 1 : -4])
    return forms


def leaks(emulator: Emulator, record: Path, outputs: list[str], token: str = TOKEN) -> list[str]:
    """Every place outside Secret Manager's own storage where the token (plain or base64) appears."""
    forms = token_forms(token)

    def has(data: bytes) -> bool:
        return any(form in data for form in forms)

    found = []
    for entry in read_record(record):
        if entry["method"] == "AddSecretVersion":
            continue
        if has(json.dumps(entry).encode()):
            found.append(f"request {entry['service']}/{entry['method']}")
    logs = emulator.data_dir / "logging.jsonl"
    if logs.exists() and has(logs.read_bytes()):
        found.append("a log entry")
    state = json.loads((emulator.data_dir / "state.json").read_text())
    for table, rows in state.items():
        if table != "secrets" and has(json.dumps(rows).encode()):
            found.append(f"emulator table {table} (build, job or execution spec)")
    for path in emulator.storage_root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name.endswith(".tar.gz") or data[:2] == b"\x1f\x8b":
            with suppress(OSError):
                data = gzip.decompress(data)
        if has(data):
            found.append(f"stored object {path.relative_to(emulator.storage_root)}")
    found += [f"command output {index}" for index, text in enumerate(outputs) if has(text.encode())]
    return found


def secret_policy_members(clients: Clients) -> list[tuple[str, str]]:
    policy = clients.secrets.get_iam_policy(request=iam_policy_pb2.GetIamPolicyRequest(resource=SECRET))
    return [(binding.role, member) for binding in policy.bindings for member in binding.members]


# ---- the campaign ---------------------------------------------------------------------------------


@dataclass
class SeedResult:
    seed: int
    commands: int = 0
    failures: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    wire_calls: int = 0
    injected: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def run_seed(seed: int, workdir: Path, unavailable: float = 0.3) -> SeedResult:
    """The user's whole flow under faults; every check's failure is listed, not raised."""
    result = SeedResult(seed)
    started = time.monotonic()
    project = make_project(workdir / "project")
    outputs = []
    with emulated(workdir, faults_spec(seed, unavailable)) as emulator:

        def command(*args: str, expect: int = 0) -> str:
            result.commands += 1
            done = cli(*args)
            outputs.append(done.output)
            if done.exit_code != expect:
                tail = done.output[-600:] if done.exception is None or done.exit_code == 2 else ""
                error = "" if done.exception is None else repr(done.exception)
                result.failures.append(f"{args[0]} exit {done.exit_code} {error} {tail}".strip())
            return done.output

        command(*up_args(project))
        run_output = command("run", "--follow")
        if "done" not in run_output:
            result.failures.append("run --follow did not show the task's last line")
        command("logs")
        as_json = command("results", "--json")
        try:
            if json.loads(as_json)["final"]["accuracy"] != 0.8:
                result.failures.append("results: wrong metrics")
        except (ValueError, KeyError):
            result.failures.append("results --json is not the execution's results.json")
        again = command(*up_args(project))
        if "Everything was already in place" not in again:
            result.failures.append("second up changed something")
        result.duplicates = duplicates(emulator, executions_expected=1)
        result.leaks = leaks(emulator, workdir / "record.jsonl", outputs)
        result.wire_calls = len(read_record(workdir / "record.jsonl"))
        result.injected = Counter(emulator.hub.faults.injected)
    result.seconds = time.monotonic() - started
    return result
