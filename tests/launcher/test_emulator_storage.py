import base64
import hashlib
import json
import os
from pathlib import Path

import pytest
from google.api_core import exceptions

from launcher.cloud_errors import disabled_api
from launcher.emulator.rpc import ApiError

ACCOUNT = "serviceAccount:gemma-trainer@demo-project.iam.gserviceaccount.com"


def _bucket(client, name: str = "demo-project-gemma3", **properties):
    bucket = client.bucket(name)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = properties.pop("uniform", False)
    bucket.labels = properties.pop("labels", {})
    return client.create_bucket(bucket, **properties)


def test_bucket_keeps_location_uniform_access_and_labels(local):
    client = local.clients().storage
    _bucket(client, location="europe-west4", uniform=True, labels={"app": "gemma-launch"})
    bucket = client.get_bucket("demo-project-gemma3")
    assert bucket.location == "EUROPE-WEST4"
    assert bucket.location_type == "region"
    assert bucket.iam_configuration.uniform_bucket_level_access_enabled
    assert bucket.iam_configuration.uniform_bucket_level_access_locked_time is not None
    assert bucket.labels == {"app": "gemma-launch"}

    plain = _bucket(client, "demo-project-plain")
    assert plain.location == "US"
    assert plain.location_type == "multi-region"
    assert not plain.iam_configuration.uniform_bucket_level_access_enabled


def test_a_bucket_of_a_project_with_cloud_storage_off_is_forbidden_naming_the_api(local):
    client = local.clients().storage
    _bucket(client)
    local.emulator.access.update_project(
        "demo-project", lambda record: record["services"].remove("storage.googleapis.com")
    )
    with pytest.raises(exceptions.Forbidden) as denied:
        client.lookup_bucket("demo-project-gemma3")
    assert disabled_api(denied.value) == "storage.googleapis.com"


def test_duplicate_bucket_is_a_conflict(local):
    client = local.clients().storage
    _bucket(client)
    with pytest.raises(exceptions.Conflict):
        _bucket(client)


@pytest.mark.parametrize(
    "name",
    [
        "ab",
        "x" * 64,
        "Upper-case",
        "has space",
        "goog-prefixed",
        "my-google-bucket",
        "192.168.5.4",
        "double..dot",
    ],
)
def test_bucket_names_gcs_rejects(local, name):
    with pytest.raises(exceptions.BadRequest) as raised:
        _bucket(local.clients().storage, name)
    assert f"Invalid bucket name: '{name}'" in str(raised.value)
    assert local.record()[-1]["outcome"] == "BAD_REQUEST"


@pytest.mark.parametrize("name", ["abc", "a_b-c.d", "x" * 63, "data.example.com"])
def test_bucket_names_gcs_accepts(local, name):
    assert _bucket(local.clients().storage, name).name == name


def test_unknown_location_is_rejected(local):
    with pytest.raises(exceptions.BadRequest):
        _bucket(local.clients().storage, location="moon-base1x")


def test_requests_are_recorded_without_object_contents(local):
    client = local.clients().storage
    bucket = _bucket(client, location="europe-west4")
    bucket.blob("runs/config.json").upload_from_string(
        b"hf_not_in_the_record", content_type="application/json"
    )
    assert bucket.blob("runs/config.json").download_as_bytes() == b"hf_not_in_the_record"
    with pytest.raises(exceptions.NotFound):
        bucket.blob("missing").download_as_bytes()

    # google-cloud-storage also fetches bucket metadata in a background thread (buckets.get) at times
    # of its own choosing, so only the calls the test made are compared.
    storage = [e for e in local.record() if e["service"] == "storage" and e["method"] != "buckets.get"]
    assert [(e["method"], e["outcome"], e["mutating"]) for e in storage] == [
        ("buckets.insert", "OK", True),
        ("objects.insert", "OK", True),
        ("objects.get", "OK", False),
        ("objects.get", "NOT_FOUND", False),
    ]
    insert_bucket, insert_object, download, _ = storage
    assert insert_bucket["request"]["resource"]["location"] == "europe-west4"
    assert insert_bucket["request"]["query"]["project"] == ["demo-project"]
    assert insert_object["request"]["resource"]["name"] == "runs/config.json"
    assert download["request"]["params"] == {"bucket_name": bucket.name, "object_id": "runs/config.json"}
    assert "hf_not_in_the_record" not in local.record_path.read_text()


def test_bucket_iam_policy_round_trips(local):
    local.clients().iam.create_service_account(
        request={"name": "projects/demo-project", "account_id": "gemma-trainer"}
    )
    bucket = _bucket(local.clients().storage, uniform=True)
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": "roles/storage.objectAdmin", "members": {ACCOUNT}})
    bucket.set_iam_policy(policy)
    read = local.clients().storage.bucket(bucket.name).get_iam_policy(requested_policy_version=3)
    assert [(b["role"], set(b["members"])) for b in read.bindings] == [
        ("roles/storage.objectAdmin", {ACCOUNT})
    ]
    iam_calls = [e["method"] for e in local.record() if "IamPolicy" in e["method"]]
    assert iam_calls == ["buckets.getIamPolicy", "buckets.setIamPolicy", "buckets.getIamPolicy"]


EXPIRING = {"title": "until 2030", "expression": "request.time < timestamp('2030-01-01T00:00:00Z')"}


def test_a_bucket_policy_with_conditions_needs_version_3_and_uniform_access(local):
    local.clients().iam.create_service_account(
        request={"name": "projects/demo-project", "account_id": "gemma-trainer"}
    )
    client = local.clients().storage
    fine_grained = _bucket(client, "demo-project-fine-grained")
    policy = fine_grained.get_iam_policy(requested_policy_version=3)
    policy.version = 3
    policy.bindings.append(
        {"role": "roles/storage.objectViewer", "members": {ACCOUNT}, "condition": EXPIRING}
    )
    with pytest.raises(exceptions.BadRequest, match="uniform bucket-level access"):
        fine_grained.set_iam_policy(policy)

    bucket = _bucket(client, uniform=True)
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append(
        {"role": "roles/storage.objectViewer", "members": {ACCOUNT}, "condition": EXPIRING}
    )
    with pytest.raises(exceptions.BadRequest, match="version 3"):
        bucket.set_iam_policy(policy)
    policy.version = 3
    bucket.set_iam_policy(policy)

    # A reader unaware of conditions could drop them on write-back: only version 3 reads them.
    with pytest.raises(exceptions.BadRequest, match="optionsRequestedPolicyVersion=3"):
        bucket.get_iam_policy()
    read = bucket.get_iam_policy(requested_policy_version=3)
    assert [b["condition"]["title"] for b in read.bindings] == ["until 2030"]


@pytest.mark.parametrize(
    "name",
    ["line\nfeed.txt", "carriage\rreturn", ".", "..", ".well-known/acme-challenge/x", "x" * 1025, "é" * 513],
)
def test_object_names_gcs_rejects(local, name):
    # https://cloud.google.com/storage/docs/objects#naming
    bucket = _bucket(local.clients().storage)
    small, large = bucket.blob(name), bucket.blob(name, chunk_size=256 * 1024)
    with pytest.raises(exceptions.BadRequest):
        small.upload_from_string(b"data")
    with pytest.raises(exceptions.BadRequest):
        large.upload_from_string(b"x" * (300 * 1024))  # a resumable upload
    assert not list(bucket.list_blobs())


def test_object_names_gcs_accepts(local):
    bucket = _bucket(local.clients().storage)
    longest = "/".join(["d" * 200] * 5) + "/" + "f" * 19  # 1024 bytes, in parts the local disk can hold
    names = [longest, "dir/.hidden", "sp ace/ünï/code.py", ".well-known/other"]
    for name in names:
        bucket.blob(name).upload_from_string(b"data")
    assert sorted(blob.name for blob in bucket.list_blobs()) == sorted(names)


def test_request_preconditions_are_enforced(local):
    # https://cloud.google.com/storage/docs/request-preconditions: a precondition that does not hold is 412.
    bucket = _bucket(local.clients().storage)
    blob = bucket.blob("runs/result.json")
    blob.upload_from_string(b"first", if_generation_match=0)
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob("runs/result.json").upload_from_string(b"second", if_generation_match=0)
    resumable = bucket.blob("runs/result.json", chunk_size=256 * 1024)
    with pytest.raises(exceptions.PreconditionFailed):
        resumable.upload_from_string(b"x" * (300 * 1024), if_generation_match=0)
    assert bucket.blob("runs/result.json").download_as_bytes() == b"first"

    blob.reload()
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(blob.name).download_as_bytes(if_generation_match=blob.generation + 1)
    blob.metadata = {"k": "v"}
    with pytest.raises(exceptions.PreconditionFailed):
        blob.patch(if_metageneration_match=blob.metageneration + 1)
    with pytest.raises(exceptions.PreconditionFailed):
        blob.delete(if_generation_not_match=blob.generation)

    bucket.blob(blob.name).upload_from_string(b"second", if_generation_match=blob.generation)
    assert bucket.blob(blob.name).download_as_bytes() == b"second"
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(blob.name).delete(if_generation_match=blob.generation)  # replaced since
    bucket.get_blob(blob.name).delete(if_generation_match=bucket.get_blob(blob.name).generation)
    assert not list(bucket.list_blobs())


def test_a_read_whose_not_match_precondition_fails_is_not_modified(local):
    # https://cloud.google.com/storage/docs/json_api/v1/status-codes#304_Not_Modified: a GET whose
    # ifGenerationNotMatch / ifMetagenerationNotMatch names the object as it is answers 304, not 412;
    # writes keep 412 (test_request_preconditions_are_enforced).
    bucket = _bucket(local.clients().storage)
    blob = bucket.blob("runs/result.json")
    blob.upload_from_string(b"first")
    blob.reload()
    with pytest.raises(exceptions.NotModified):
        bucket.blob(blob.name).download_as_bytes(if_generation_not_match=blob.generation)
    with pytest.raises(exceptions.NotModified):
        bucket.get_blob(blob.name, if_metageneration_not_match=blob.metageneration)
    # A failed ...Match condition is still 412, even when a ...NotMatch one fails too.
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(blob.name).download_as_bytes(
            if_generation_match=blob.generation + 1, if_generation_not_match=blob.generation
        )
    assert bucket.blob(blob.name).download_as_bytes(if_generation_not_match=blob.generation + 1) == b"first"
    with pytest.raises(exceptions.PreconditionFailed):
        bucket.blob(blob.name).delete(if_metageneration_not_match=blob.metageneration)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def test_import_tree_registers_changes_and_deletions_of_mounted_files(local):
    client = local.clients().storage
    bucket = _bucket(client, location="europe-west4")
    bucket.blob("uploaded.txt").upload_from_string(b"via the API")
    uploaded = bucket.get_blob("uploaded.txt")
    storage = local.emulator.services["storage"]
    root = local.emulator.bucket_dir(bucket.name)

    # What a trainer writes through the GCS FUSE mount lands in the bucket's directory.
    (root / "out" / "checkpoint-1").mkdir(parents=True)
    (root / "out" / "results.json").write_text(json.dumps({"accuracy": 0.9}))
    (root / "out" / "checkpoint-1" / "adapter.bin").write_bytes(b"\x00" * 1000)
    assert storage.import_tree(bucket.name) == ["out/checkpoint-1/adapter.bin", "out/results.json"]

    blobs = {blob.name: blob for blob in client.list_blobs(bucket.name)}
    assert sorted(blobs) == ["out/checkpoint-1/adapter.bin", "out/results.json", "uploaded.txt"]
    results = blobs["out/results.json"]
    assert results.size == len(json.dumps({"accuracy": 0.9}))
    assert results.content_type == "application/json"
    assert results.md5_hash == _md5(json.dumps({"accuracy": 0.9}).encode())
    assert results.crc32c and results.time_created and results.generation
    assert json.loads(results.download_as_bytes()) == {"accuracy": 0.9}
    assert blobs["uploaded.txt"].generation == uploaded.generation

    # Nothing changed: nothing is rewritten.
    assert storage.import_tree(bucket.name) == []

    (root / "out" / "results.json").write_text(json.dumps({"accuracy": 0.95}))
    (root / "out" / "checkpoint-1" / "adapter.bin").unlink()
    assert storage.import_tree(bucket.name) == ["out/results.json", "out/checkpoint-1/adapter.bin"]
    changed = bucket.get_blob("out/results.json")
    assert changed.generation != results.generation
    assert json.loads(changed.download_as_bytes()) == {"accuracy": 0.95}
    assert bucket.get_blob("out/checkpoint-1/adapter.bin") is None
    assert sorted(blob.name for blob in client.list_blobs(bucket.name)) == [
        "out/results.json",
        "uploaded.txt",
    ]


def test_import_tree_skips_a_file_a_running_task_deletes_while_it_reads(local, monkeypatch):
    client = local.clients().storage
    bucket = _bucket(client, location="europe-west4")
    storage = local.emulator.services["storage"]
    root = local.emulator.bucket_dir(bucket.name)
    (root / "out" / "checkpoint-1").mkdir(parents=True)
    (root / "out" / "checkpoint-1" / "optimizer.pt").write_bytes(b"\x00" * 100)
    (root / "out" / "results.json").write_text("{}")
    real_stat, looks = Path.stat, []

    def rotated_away(path: Path, *args, **kwargs):
        # The trainer drops its oldest checkpoint after import_tree found it a file, before it reads it.
        if path.name == "optimizer.pt":
            looks.append(path)
            if len(looks) == 2:
                os.remove(path)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", rotated_away)
    assert storage.import_tree(bucket.name) == ["out/results.json"]
    assert [blob.name for blob in client.list_blobs(bucket.name)] == ["out/results.json"]


def test_import_tree_of_missing_bucket_is_not_found(local):
    with pytest.raises(ApiError) as raised:
        local.emulator.services["storage"].import_tree("no-such-bucket")
    assert raised.value.code.name == "NOT_FOUND"


def test_reading_a_missing_object_is_a_404_and_no_error_in_the_emulators_log(local, caplog):
    bucket = _bucket(local.clients().storage)
    caplog.set_level("DEBUG")
    with pytest.raises(exceptions.NotFound):
        bucket.blob("absent.json").download_as_bytes()
    assert not [record for record in caplog.records if record.levelname == "ERROR"], caplog.text
