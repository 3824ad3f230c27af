"""Faults on the wire: every emulated service (storage included) refuses calls or loses replies, and
the launcher's `up`, `run --follow`, `logs` and `results` still finish, with nothing duplicated.

bench/reliability.py runs the same campaign over more seeds for docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from contextlib import suppress

import pytest
import requests
from google.api_core import exceptions

from launcher.cloud import RETRY, Clients
from launcher.emulator.faults import Faults
from launcher.emulator.record import read_record
from launcher.emulator.server import Emulator
from tests.support.reliability import (
    PROJECT,
    TOKEN,
    cli,
    duplicates,
    emulated,
    leaks,
    make_project,
    run_seed,
    up_args,
)

SEEDS = [3, 7]


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_the_whole_flow_survives_30_percent_faults(seed, tmp_path, figures):
    result = run_seed(seed, tmp_path)
    assert result.failures == []
    assert result.duplicates == []
    assert result.leaks == []
    # The faults really hit: refusals of several kinds, on the gRPC services and on storage.
    assert result.injected["UNAVAILABLE"] > 5
    storage_refused = [
        entry
        for entry in read_record(tmp_path / "record.jsonl")
        if entry["service"] == "storage" and entry["outcome"] != "OK"
    ]
    assert storage_refused
    figures(
        campaign_seeds_in_tests=1,
        campaign_commands_in_tests=result.commands,
        campaign_failures_in_tests=len(result.failures),
    )


def test_storage_routes_answer_injected_faults_with_http_statuses(tmp_path):
    for spec, status in (
        ("UNAVAILABLE=1", 503),
        ("DEADLINE_EXCEEDED=1", 504),
        ("RESOURCE_EXHAUSTED=1", 429),
        ("INTERNAL=1", 500),
    ):
        with Emulator(data_dir=tmp_path / spec, faults=spec) as emulator:
            reply = requests.get(f"{emulator.storage_host}/storage/v1/b?project={PROJECT}", timeout=10)
            assert reply.status_code == status, spec
            assert reply.json()["error"]["code"] == status
            assert emulator.hub.faults.injected == Counter({spec.split("=")[0]: 1})


def test_a_lost_storage_reply_still_carries_out_the_mutation(tmp_path, monkeypatch):
    with Emulator(data_dir=tmp_path / "emulator", faults="lost=1") as emulator:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.storage_host)
        client = Clients(PROJECT).storage
        with pytest.raises(exceptions.ServiceUnavailable):
            client.create_bucket("lost-reply-bucket", location="europe-west4", retry=None)
        assert client.lookup_bucket("lost-reply-bucket") is not None  # reads are never lost
        with pytest.raises(exceptions.Conflict):
            client.create_bucket("lost-reply-bucket", location="europe-west4", retry=None)


class FirstReplyLost(Faults):
    """Loses the reply of the first successful call of each mutating method, deterministically: every
    kind of create meets a lost reply once. The method is the caller's (rpc.py's `full_name`, storage's
    `method`), as Faults.reply_lost takes no argument."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.lost_methods: list[str] = []

    def reply_lost(self) -> bool:
        caller = sys._getframe(1).f_locals
        method = str(caller.get("full_name") or caller.get("method"))
        with self._lock:
            if method in self.lost_methods:
                return False
            self.lost_methods.append(method)
            self.injected["lost"] += 1
        return True


@pytest.mark.slow
def test_lost_create_replies_are_recognised_and_nothing_is_duplicated(tmp_path):
    project = make_project(tmp_path / "project")
    with emulated(tmp_path) as emulator:
        emulator.hub.faults = emulator.services["storage"].faults = FirstReplyLost()
        outputs = []
        for args in (up_args(project), ["run", "--follow"], ["results", "--json"], up_args(project)):
            done = cli(*args)
            outputs.append(done.output)
            assert done.exit_code == 0, (args, done.output)
        assert "Everything was already in place" in outputs[-1]
        assert duplicates(emulator, executions_expected=1) == []
        assert leaks(emulator, tmp_path / "record.jsonl", outputs) == []
        methods = Counter(entry["method"] for entry in read_record(tmp_path / "record.jsonl"))
    lost = {name.rsplit("/", 1)[-1] for name in emulator.hub.faults.lost_methods}
    assert {
        "CreateServiceAccount",
        "buckets.insert",
        "buckets.setIamPolicy",
        "CreateRepository",
        "CreateSecret",
        "AddSecretVersion",
        "SetIamPolicy",
        "objects.insert",
        "CreateBuild",
        "CreateJob",
        "RunJob",
    } <= lost
    # Each create was sent again after its lost reply, and ALREADY_EXISTS was taken as done; the
    # version and the build were found by their retries instead of being made twice.
    for method in ("CreateRepository", "CreateSecret", "CreateJob", "buckets.insert"):
        assert methods[method] == 2, method
    # Two accounts (the job's and the build's): only the first reply was lost.
    assert methods["CreateServiceAccount"] == 3
    assert methods["AddSecretVersion"] == 1
    assert methods["CreateBuild"] == 1
    assert methods["RunJob"] == 1


def launcher_subprocess(args: list[str], env: dict[str, str], timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", "from launcher.cli import main; main()", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_retries_back_off_then_give_up_with_an_error_and_a_hint(tmp_path):
    record = tmp_path / "record.jsonl"
    with Emulator(data_dir=tmp_path / "emulator", faults="UNAVAILABLE=1", record=record) as emulator:
        env = {
            "GEMMA_LAUNCH_EMULATOR_HOST": emulator.host,
            "STORAGE_EMULATOR_HOST": emulator.storage_host,
            "PROJECT_ID": PROJECT,
            "HF_TOKEN": TOKEN,
            "GEMMA_LAUNCH_RETRY_DEADLINE": "2",
        }
        outcomes = {
            command: launcher_subprocess(
                [command, *(["--skip-stage", "--skip-build"] if command == "up" else [])], env
            )
            for command in ("up", "run", "status", "results")
        }
    for command, done in outcomes.items():
        assert done.returncode == 2, (command, done.stderr[-2000:])
        lines = (done.stdout + done.stderr).strip().splitlines()
        errors = [line for line in lines if line.startswith("Error:")]
        assert len(errors) == 1 and "after retrying transient errors for 2 s" in errors[0], (command, lines)
        assert any(line.startswith("Hint:") for line in lines), command
        assert "Traceback" not in done.stderr, command
    # Backed off: a couple of seconds of retrying is a handful of attempts, not a tight loop.
    calls = read_record(record)
    first = [entry for entry in calls if entry["method"] == calls[0]["method"]]
    assert 2 <= len(first) <= 20
    assert all(entry["outcome"] == "UNAVAILABLE" for entry in first)


class ResettingProxy:
    """A TCP forwarder to `port` that resets its first `resets` connections before answering them."""

    def __init__(self, port: int, resets: int) -> None:
        self.port = port
        self.resets_left = resets
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            if self.resets_left > 0:
                self.resets_left -= 1
                connection.recv(65536)
                # Linger 0: close() sends RST, which the client sees as "connection reset by peer".
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                connection.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.port))
            for source, target in ((connection, upstream), (upstream, connection)):
                threading.Thread(target=_pipe, args=(source, target), daemon=True).start()

    def close(self) -> None:
        self._listener.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def test_storage_calls_retry_a_reset_connection(tmp_path, monkeypatch):
    with Emulator(data_dir=tmp_path / "emulator") as emulator:
        proxy = ResettingProxy(emulator.storage_port, resets=2)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        try:
            assert Clients(PROJECT).storage.lookup_bucket("no-such-bucket-here", retry=RETRY) is None
        finally:
            proxy.close()
    assert proxy.resets_left == 0


@pytest.mark.slow
def test_down_converges_when_the_first_reply_of_every_delete_is_lost(tmp_path):
    project = make_project(tmp_path / "project")
    with emulated(tmp_path) as emulator:
        for args in (up_args(project), ["run", "--follow"]):
            assert cli(*args).exit_code == 0, args
        # From here on, the first reply of each mutating method is lost: every delete, every policy
        # write that takes a binding out, every object deleted from the bucket.
        emulator.hub.faults = emulator.services["storage"].faults = FirstReplyLost()
        first = cli("down", "--delete-bucket", "--yes", "--json")
        assert first.exit_code == 0, first.output
        assert emulator.hub.faults.injected["lost"] >= 8
        # Each lost reply recognised: reported deleted, not absent (up --skip-stage made no staging job).
        absent = [c["kind"] for c in json.loads(first.output)["changes"] if c["status"] == "absent"]
        assert absent == ["staging job"]
        second = cli("down", "--delete-bucket", "--yes", "--json")
        assert second.exit_code == 0, second.output
        assert {change["status"] for change in json.loads(second.output)["changes"]} == {"absent"}
        assert [
            name
            for name in ("run_jobs", "repositories", "secrets", "service_accounts")
            if emulator.state.table(name)
        ] == []
        assert emulator.services["storage"].storage.buckets == {}
