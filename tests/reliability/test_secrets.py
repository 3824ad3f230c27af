"""Secrets and privilege: the HF token goes to Secret Manager and nowhere else, and the job's service
account holds exactly two grants, each on one resource."""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile

import pytest

from launcher.cloud import Clients
from launcher.emulator.record import read_record
from tests.support.reliability import (
    BUCKET,
    SA,
    SECRET,
    TOKEN,
    cli,
    emulated,
    leaks,
    make_project,
    secret_policy_members,
    token_forms,
    up_args,
)


@pytest.mark.slow
def test_the_token_reaches_the_task_and_leaks_nowhere(tmp_path, figures):
    project = make_project(tmp_path / "project")
    outputs = []
    with emulated(tmp_path) as emulator:
        for args in (up_args(project), ["run", "--follow"], ["logs"], ["results"], ["status"]):
            done = cli(*args)
            assert done.exit_code == 0, (args, done.output)
            outputs.append(done.output)
        found = leaks(emulator, tmp_path / "record.jsonl", outputs)
        record = read_record(tmp_path / "record.jsonl")
        archives = list((emulator.bucket_dir(BUCKET) / "source").glob("*.tar.gz"))
        members = []
        for archive in archives:
            with tarfile.open(archive) as opened:
                members += opened.getnames()
    assert found == []
    # Positive controls: the checks do see the token where it must be. It crossed the wire once, in
    # AddSecretVersion (base64 in the request's JSON), and the task got it from the secret.
    carrying = [
        entry for entry in record if any(form in json.dumps(entry).encode() for form in token_forms(TOKEN))
    ]
    assert [entry["method"] for entry in carrying] == ["AddSecretVersion"]
    assert carrying[0]["request"]["payload"]["data"] == base64.b64encode(TOKEN.encode()).decode()
    run_output = outputs[1]
    assert f"token-sha256 {hashlib.sha256(TOKEN.encode()).hexdigest()}" in run_output
    # The task's argv as the kernel has it (/proc/self/cmdline) carries no token.
    cmdline = json.loads(
        next(line for line in run_output.splitlines() if " cmdline " in line).split(" cmdline ", 1)[1]
    )
    assert cmdline and not any(TOKEN in part for part in cmdline)
    # The user's .env (holding the token) stayed out of the source archive.
    assert "fake_trainer.py" in members and ".env" not in members
    figures(leak_checks=1, leaks_found=len(found))


def test_token_forms_find_the_token_inside_base64_at_any_offset():
    for prefix in (b"", b"x", b"xy", b'{"a": 1, "token": "'):
        encoded = base64.b64encode(prefix + TOKEN.encode() + b'"}')
        assert any(form in encoded for form in token_forms(TOKEN)), prefix
    assert not any(
        form in base64.b64encode(b"hf_other_token_value_0000000000") for form in token_forms(TOKEN)
    )


@pytest.mark.slow
def test_the_service_account_holds_exactly_two_grants_on_one_resource_each(tmp_path, figures):
    project = make_project(tmp_path / "project")
    with emulated(tmp_path) as emulator:
        assert cli(*up_args(project)).exit_code == 0
        clients = Clients("demo-project")
        bucket_policy = clients.storage.bucket(BUCKET).get_iam_policy(requested_policy_version=3)
        bucket_grants = [(b["role"], m) for b in bucket_policy.bindings for m in b["members"]]
        secret_grants = secret_policy_members(clients)
        record = read_record(tmp_path / "record.jsonl")
        state = json.loads((emulator.data_dir / "state.json").read_text())
    member = f"serviceAccount:{SA}"
    assert [grant for grant in bucket_grants if SA in grant[1]] == [("roles/storage.objectUser", member)]
    assert secret_grants == [("roles/secretmanager.secretAccessor", member)]
    # The job's account is named in no other policy: the other policy writes (repository, project) are
    # the build account's grants, and no other stored policy names the job's account.
    policy_writes = {
        entry["request"]["params"].get("bucket_name")
        if entry["service"] == "storage"
        else entry["request"]["resource"]
        for entry in record
        if entry["method"] in ("SetIamPolicy", "buckets.setIamPolicy")
    }
    repository = "projects/demo-project/locations/europe-west4/repositories/gemma3-finetuning-repo"
    assert policy_writes <= {SECRET, BUCKET, repository, "projects/demo-project"}, policy_writes
    for table, rows in state.items():
        for key, row in rows.items():
            policy = row.get("policy") if isinstance(row, dict) else None
            if policy and SA in json.dumps(policy):
                assert table == "secrets", (table, key)
    figures(grants_checked=2, extra_grants_found=0)
