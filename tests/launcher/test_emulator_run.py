"""Cloud Run v2 in the emulator, driven through the real run_v2 clients."""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.api import launch_stage_pb2
from google.api_core import exceptions
from google.api_core.future.polling import DEFAULT_POLLING
from google.cloud import artifactregistry_v1, run_v2
from google.cloud.run_v2.services.tasks.transports.grpc import TasksGrpcTransport
from google.iam.v1 import policy_pb2

from launcher.emulator.run_api import RunService

PROJECT = "demo-project"
REGION = "europe-west4"
PARENT = f"projects/{PROJECT}/locations/{REGION}"
JOB = f"{PARENT}/jobs/trainer"
ACCOUNT = f"gemma-trainer@{PROJECT}.iam.gserviceaccount.com"
BUCKET = f"{PROJECT}-gemma3-finetuning"
REPO = f"{PARENT}/repositories/gemma"
IMAGE = f"{REGION}-docker.pkg.dev/{PROJECT}/gemma/trainer:latest"
DIGEST = "sha256:" + "c" * 64
SECRET = f"projects/{PROJECT}/secrets/HF_TOKEN"
TOKEN = "hf_emulated_token"
Condition = run_v2.Condition
# The clients' default LRO polling starts at 1 s; the emulator's operations finish in 0.2 s.
FAST = DEFAULT_POLLING.with_delay(initial=0.05, maximum=0.3).with_timeout(60)

# The fake image's program: what the test needs the task to do, chosen by its first argument.
TASK_PY = """
import json, os, pathlib, sys, time
mode, *rest = sys.argv[1:]
attempt = int(os.environ["CLOUD_RUN_TASK_ATTEMPT"])
if mode == "report":
    out = pathlib.Path(rest[0])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("written through the mount")
    print(json.dumps({"argv": rest, "env": dict(os.environ)}))
elif mode == "fail-first":
    print(f"attempt {attempt}")
    sys.exit(1 if attempt == 0 else 0)
elif mode == "fail":
    print("failing", file=sys.stderr)
    sys.exit(3)
elif mode == "sleep-first":
    print(f"ready {attempt}", flush=True)
    if attempt == 0:
        time.sleep(60)
elif mode == "lines":
    for n in range(3):
        print(f"line {n}")
elif mode == "task-1-sleeps":
    print("task", os.environ["CLOUD_RUN_TASK_INDEX"], flush=True)
    if os.environ["CLOUD_RUN_TASK_INDEX"] == "1":
        time.sleep(60)
elif mode == "whoami":
    # What the trainer and the staging worker do: ADC, then a Cloud Storage call with it.
    import google.auth
    import google.auth.transport.requests
    from google.cloud import storage
    credentials, project = google.auth.default()
    credentials.refresh(google.auth.transport.requests.Request())
    client = storage.Client(project=project, credentials=credentials)
    list(client.bucket(rest[0]).list_blobs(max_results=1))
    print(json.dumps({"email": credentials.service_account_email, "project": project}), flush=True)
    client.bucket(rest[0]).reload()
"""


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def container(**changes) -> dict:
    spec = {
        "image": IMAGE,
        "args": ["report", "/mnt/gcs/out/result.txt"],
        "env": [
            {"name": "MODEL_DIR", "value": "/mnt/gcs/models/gemma"},
            {
                "name": "HF_TOKEN",
                "value_source": {"secret_key_ref": {"secret": "HF_TOKEN", "version": "latest"}},
            },
        ],
        "resources": {"limits": {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}},
        "volume_mounts": [{"name": "gcs", "mount_path": "/mnt/gcs"}],
    }
    return spec | changes


def job_spec(container_changes: dict | None = None, **task_changes) -> dict:
    task = {
        "containers": [container(**(container_changes or {}))],
        "volumes": [{"name": "gcs", "gcs": {"bucket": BUCKET}}],
        "service_account": ACCOUNT,
        "max_retries": 0,
        "timeout": {"seconds": 60},
        "node_selector": {"accelerator": "nvidia-l4"},
        "gpu_zonal_redundancy_disabled": True,
    }
    return {"template": {"template": task | task_changes}}


class Cloud:
    def __init__(self, local) -> None:
        self.local = local
        clients = local.clients(PROJECT)
        self.jobs = clients.jobs
        self.executions = clients.executions
        self.logging = clients.logging
        self.storage = clients.storage
        self.tasks = run_v2.TasksClient(
            transport=TasksGrpcTransport(channel=grpc.insecure_channel(local.emulator.host))
        )

    def create(self, spec: dict | None = None, job_id: str = "trainer", **request) -> run_v2.Job:
        operation = self.jobs.create_job(
            request={"parent": PARENT, "job_id": job_id, "job": spec or job_spec(), **request}
        )
        return operation.result(polling=FAST)

    def run(self, overrides: dict | None = None) -> run_v2.Execution:
        """Start an execution and wait until it is done, as `gcloud run jobs execute --wait` does."""
        operation = self.jobs.run_job(request={"name": JOB, "overrides": overrides or {}})
        assert operation.metadata.name.startswith(f"{JOB}/executions/trainer-")
        return operation.result(polling=FAST)

    def start(self, overrides: dict | None = None) -> str:
        return self.jobs.run_job(request={"name": JOB, "overrides": overrides or {}}).metadata.name

    def log_texts(self, execution: str, stream: str = "stdout") -> list[str]:
        short = execution.rsplit("/", 1)[-1]
        entries = self.logging.list_log_entries(
            request={
                "resource_names": [f"projects/{PROJECT}"],
                "filter": (
                    f'resource.type="cloud_run_job" AND resource.labels.job_name="trainer" AND '
                    f'labels."run.googleapis.com/execution_name"="{short}" AND '
                    f'logName="projects/{PROJECT}/logs/run.googleapis.com%2F{stream}"'
                ),
            }
        )
        return [entry.text_payload for entry in entries]


@pytest.fixture
def cloud(local) -> Cloud:
    """A project as `gemma-launch up` leaves it: account, bucket and secret with access, image."""
    clients = local.clients(PROJECT)
    clients.iam.create_service_account(request={"name": f"projects/{PROJECT}", "account_id": "gemma-trainer"})
    bucket = clients.storage.create_bucket(BUCKET, location=REGION)
    bucket_policy = bucket.get_iam_policy()
    bucket_policy.bindings.append(
        {"role": "roles/storage.objectUser", "members": {f"serviceAccount:{ACCOUNT}"}}
    )
    bucket.set_iam_policy(bucket_policy)
    secret = clients.secrets.create_secret(
        request={
            "parent": f"projects/{PROJECT}",
            "secret_id": "HF_TOKEN",
            "secret": {"replication": {"automatic": {}}},
        }
    )
    clients.secrets.add_secret_version(request={"parent": secret.name, "payload": {"data": TOKEN.encode()}})
    policy = policy_pb2.Policy(
        bindings=[
            policy_pb2.Binding(
                role="roles/secretmanager.secretAccessor", members=[f"serviceAccount:{ACCOUNT}"]
            )
        ]
    )
    clients.secrets.set_iam_policy(request={"resource": secret.name, "policy": policy})
    clients.registry.create_repository(
        request={
            "parent": PARENT,
            "repository_id": "gemma",
            "repository": {"format_": artifactregistry_v1.Repository.Format.DOCKER},
        }
    ).result(polling=FAST)
    local.emulator.services["registry"].record_image(REPO, "trainer", DIGEST, ["latest"])
    return Cloud(local)


@pytest.fixture
def image(local, cloud) -> Path:
    """The snapshot Cloud Build would have written for the image: a small program and its config."""
    snapshot = local.emulator.services["builds"].image_dir(DIGEST)
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / "task.py").write_text(TASK_PY)
    config = {
        "entrypoint": ["python", "/app/task.py"],
        "cmd": ["lines"],
        "workdir": "/app",
        "env": {"FROM_IMAGE": "yes", "PATH": "/opt/in/the/container"},
    }
    (snapshot / ".image.json").write_text(json.dumps(config))
    return snapshot


def completed(execution: run_v2.Execution) -> run_v2.Condition:
    return next(c for c in execution.conditions if c.type_ == "Completed")


# ---- Jobs


def test_create_get_list_update_delete(cloud):
    job = cloud.create()
    assert job.name == JOB
    assert job.uid and job.etag and job.creator
    assert job.generation == 1
    assert job.terminal_condition.state == Condition.State.CONDITION_SUCCEEDED
    assert not job.reconciling
    assert job.template.task_count == 1  # defaults filled as Cloud Run fills them
    assert job.template.template.timeout.total_seconds() == 60
    assert cloud.jobs.get_job(name=JOB) == job
    assert [j.name for j in cloud.jobs.list_jobs(parent=PARENT)] == [JOB]
    with pytest.raises(exceptions.AlreadyExists):
        cloud.create()

    # The same spec again (output-only fields as the client got them) changes nothing.
    same = cloud.jobs.update_job(job=job).result(polling=FAST)
    assert (same.generation, same.etag, same.update_time) == (1, job.etag, job.update_time)

    changed = run_v2.Job(job)
    changed.template.template.containers[0].args = ["lines"]
    updated = cloud.jobs.update_job(job=changed).result(polling=FAST)
    assert updated.generation == 2
    assert updated.etag != job.etag
    assert updated.create_time == job.create_time
    assert cloud.jobs.get_job(name=JOB).template.template.containers[0].args == ["lines"]
    with pytest.raises(exceptions.Aborted):
        cloud.jobs.update_job(job=changed)  # the etag of generation 1 is stale now

    cloud.jobs.delete_job(name=JOB).result(polling=FAST)
    with pytest.raises(exceptions.NotFound):
        cloud.jobs.get_job(name=JOB)


def test_update_with_allow_missing_creates_and_without_is_not_found(cloud):
    job = run_v2.Job(job_spec(), name=JOB)
    with pytest.raises(exceptions.NotFound):
        cloud.jobs.update_job(job=job)
    created = cloud.jobs.update_job(request={"job": job, "allow_missing": True}).result(polling=FAST)
    assert created.generation == 1
    assert cloud.jobs.get_job(name=JOB).uid == created.uid


def test_validate_only_checks_and_stores_nothing(cloud):
    job = cloud.create(validate_only=True)
    assert job.name == JOB
    with pytest.raises(exceptions.NotFound):
        cloud.jobs.get_job(name=JOB)
    with pytest.raises(exceptions.InvalidArgument):
        cloud.create(job_spec({"image": ""}), validate_only=True)


def _limits(**limits) -> dict:
    return {"resources": {"limits": limits}}


REJECTED = {
    "no image": (job_spec({"image": ""}), exceptions.InvalidArgument),
    "two GPUs": (
        job_spec(_limits(cpu="8", memory="32Gi", **{"nvidia.com/gpu": "2"})),
        exceptions.InvalidArgument,
    ),
    "GPU without accelerator": (job_spec(node_selector={}), exceptions.InvalidArgument),
    "accelerator without GPU": (job_spec(_limits(cpu="4", memory="16Gi")), exceptions.InvalidArgument),
    "unknown accelerator": (
        job_spec(node_selector={"accelerator": "nvidia-a100"}),
        exceptions.InvalidArgument,
    ),
    "L4 with 2 CPU": (
        job_spec(_limits(cpu="2000m", memory="16Gi", **{"nvidia.com/gpu": "1"})),
        exceptions.InvalidArgument,
    ),
    # 16G is 16 * 10**9 bytes, below the 16 GiB an L4 needs.
    "L4 with 16G": (
        job_spec(_limits(cpu="4", memory="16G", **{"nvidia.com/gpu": "1"})),
        exceptions.InvalidArgument,
    ),
    "RTX PRO 6000 with 16 CPU": (
        job_spec(
            _limits(cpu="16", memory="80Gi", **{"nvidia.com/gpu": "1"}),
            node_selector={"accelerator": "nvidia-rtx-pro-6000"},
        )
        | {"launch_stage": "BETA"},
        exceptions.InvalidArgument,
    ),
    "RTX PRO 6000 at GA": (
        job_spec(
            _limits(cpu="20", memory="80Gi", **{"nvidia.com/gpu": "1"}),
            node_selector={"accelerator": "nvidia-rtx-pro-6000"},
        ),
        exceptions.InvalidArgument,
    ),
    "RTX PRO 6000 with 21 CPU": (
        job_spec(
            _limits(cpu="21", memory="84Gi", **{"nvidia.com/gpu": "1"}),
            node_selector={"accelerator": "nvidia-rtx-pro-6000"},
        )
        | {"launch_stage": "BETA"},
        exceptions.InvalidArgument,
    ),
    "RTX PRO 6000 with 20 CPU and 100Gi": (
        job_spec(
            _limits(cpu="20", memory="100Gi", **{"nvidia.com/gpu": "1"}),
            node_selector={"accelerator": "nvidia-rtx-pro-6000"},
        )
        | {"launch_stage": "BETA"},
        exceptions.InvalidArgument,
    ),
    "L4 with 4 CPU and 32Gi": (
        job_spec(_limits(cpu="4", memory="32Gi", **{"nvidia.com/gpu": "1"})),
        exceptions.InvalidArgument,
    ),
    "L4 with 12 CPU": (
        job_spec(_limits(cpu="12", memory="32Gi", **{"nvidia.com/gpu": "1"})),
        exceptions.InvalidArgument,
    ),
    "CPU job with 3 CPU": (
        job_spec(_limits(cpu="3", memory="4Gi"), node_selector={}),
        exceptions.InvalidArgument,
    ),
    "CPU job with half a CPU": (
        job_spec(_limits(cpu="500m", memory="512Mi"), node_selector={}),
        exceptions.InvalidArgument,
    ),
    "CPU job with 1 CPU and 8Gi": (
        job_spec(_limits(cpu="1", memory="8Gi"), node_selector={}),
        exceptions.InvalidArgument,
    ),
    "CPU job with 8 CPU and 64Gi": (
        job_spec(_limits(cpu="8", memory="64Gi"), node_selector={}),
        exceptions.InvalidArgument,
    ),
    "GPU task over 1 h at GA": (job_spec(timeout={"seconds": 3601}), exceptions.InvalidArgument),
    "GPU task over 12 h": (
        job_spec(timeout={"seconds": 12 * 3600 + 1}) | {"launch_stage": "BETA"},
        exceptions.InvalidArgument,
    ),
    "deprecated launch stage": (job_spec() | {"launch_stage": "DEPRECATED"}, exceptions.InvalidArgument),
    "11 retries": (job_spec(max_retries=11), exceptions.InvalidArgument),
    "parallelism over the task count": (
        {"template": job_spec()["template"] | {"task_count": 2, "parallelism": 3}},
        exceptions.InvalidArgument,
    ),
    "timeout over 168 h": (job_spec(timeout={"seconds": 168 * 3600 + 1}), exceptions.InvalidArgument),
    "env set twice": (
        job_spec({"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}),
        exceptions.InvalidArgument,
    ),
    "reserved env": (
        job_spec({"env": [{"name": "CLOUD_RUN_TASK_INDEX", "value": "7"}]}),
        exceptions.InvalidArgument,
    ),
    "mount of an undeclared volume": (job_spec(volumes=[]), exceptions.InvalidArgument),
    "mount path with a colon": (
        job_spec({"volume_mounts": [{"name": "gcs", "mount_path": "/mnt/gcs:rw"}]}),
        exceptions.InvalidArgument,
    ),
    "first generation execution environment": (
        job_spec(execution_environment="EXECUTION_ENVIRONMENT_GEN1"),
        exceptions.InvalidArgument,
    ),
    "mount under /proc": (
        job_spec({"volume_mounts": [{"name": "gcs", "mount_path": "/proc/gcs"}]}),
        exceptions.InvalidArgument,
    ),
    "mount at /dev": (
        job_spec({"volume_mounts": [{"name": "gcs", "mount_path": "/dev"}]}),
        exceptions.InvalidArgument,
    ),
    "bucket given as a gs:// URL": (
        job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": f"gs://{BUCKET}"}}]),
        exceptions.InvalidArgument,
    ),
    "bucket with a path": (
        job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": f"{BUCKET}/models"}}]),
        exceptions.InvalidArgument,
    ),
    "mount option with its leading --": (
        job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": BUCKET, "mount_options": ["--implicit-dirs"]}}]),
        exceptions.InvalidArgument,
    ),
    "two gcsfuse flags in one mount option": (
        job_spec(
            volumes=[{"name": "gcs", "gcs": {"bucket": BUCKET, "mount_options": ["implicit-dirs uid=1"]}}]
        ),
        exceptions.InvalidArgument,
    ),
    "container name that is not a DNS label": (job_spec({"name": "Trainer_1"}), exceptions.InvalidArgument),
    "env value over 32768 bytes": (
        job_spec({"env": [{"name": "BIG", "value": "x" * 32769}]}),
        exceptions.InvalidArgument,
    ),
    "1001 env vars": (
        job_spec({"env": [{"name": f"V{n}", "value": "1"} for n in range(1001)]}),
        exceptions.InvalidArgument,
    ),
    "missing bucket": (
        job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": "no-such-bucket"}}]),
        exceptions.FailedPrecondition,
    ),
    "missing service account": (
        job_spec(service_account=f"nobody@{PROJECT}.iam.gserviceaccount.com"),
        exceptions.PermissionDenied,
    ),
    "missing secret": (
        job_spec(
            {
                "env": [
                    {"name": "T", "value_source": {"secret_key_ref": {"secret": "NOPE", "version": "latest"}}}
                ]
            }
        ),
        exceptions.NotFound,
    ),
    "missing image": (
        job_spec({"image": f"{REGION}-docker.pkg.dev/{PROJECT}/gemma/other:latest"}),
        exceptions.NotFound,
    ),
}


def test_rejects_what_cloud_run_rejects(cloud):
    # One emulator for all the cases: each is a single CreateJob that must fail and store nothing.
    answers = {}
    for case, (spec, _) in REJECTED.items():
        try:
            cloud.create(spec)
            answers[case] = None
        except exceptions.GoogleAPICallError as error:
            answers[case] = type(error)
    assert answers == {case: error for case, (_, error) in REJECTED.items()}
    assert list(cloud.jobs.list_jobs(parent=PARENT)) == []


def test_labels_that_are_not_valid_google_cloud_labels_are_refused(cloud):
    """ "Only valid Google Cloud labels can be used on Cloud Run", on the job and its template alike."""
    bad = {
        "upper-case key": {"Team": "ml"},
        "key starting with a digit": {"1team": "ml"},
        "value with a space": {"team": "machine learning"},
        "value over 63 characters": {"team": "x" * 64},
        "65 labels": {f"k{n}": "v" for n in range(65)},
    }
    for case, labels in bad.items():
        for where in ("job", "template"):
            spec = job_spec()
            if where == "job":
                spec["labels"] = labels
            else:
                spec["template"]["labels"] = labels
            with pytest.raises(exceptions.InvalidArgument) as refused:
                cloud.create(spec)
            assert "label" in refused.value.message, (case, where)
    assert list(cloud.jobs.list_jobs(parent=PARENT)) == []
    # Lower-case keys, international letters and an empty value are valid labels.
    job = cloud.create(job_spec() | {"labels": {"managed-by": "gemma-launch", "équipe": "", "k_2": "a-b_1"}})
    assert job.labels["managed-by"] == "gemma-launch"


def test_job_id_rules(cloud):
    for job_id in ["Trainer", "9trainer", "trainer-", "t" * 64, "has_underscore"]:
        with pytest.raises(exceptions.InvalidArgument):
            cloud.create(job_id=job_id)
    assert cloud.create(job_id="t" * 63).name.endswith("/jobs/" + "t" * 63)


def test_run_job_checks_override_secrets_and_validate_only_starts_nothing(cloud):
    cloud.create()
    missing = {"name": "T", "value_source": {"secret_key_ref": {"secret": "NOPE", "version": "latest"}}}
    with pytest.raises(exceptions.NotFound):
        cloud.jobs.run_job(request={"name": JOB, "overrides": {"container_overrides": [{"env": [missing]}]}})
    with pytest.raises(exceptions.InvalidArgument):
        cloud.jobs.run_job(request={"name": JOB, "overrides": {"timeout": {"seconds": 200 * 3600}}})
    planned = cloud.jobs.run_job(request={"name": JOB, "validate_only": True}).result(polling=FAST)
    assert planned.name.startswith(f"{JOB}/executions/trainer-")
    assert list(cloud.executions.list_executions(parent=JOB)) == []
    assert cloud.jobs.get_job(name=JOB).execution_count == 0


def test_gpu_minimums_met_are_accepted(cloud):
    cloud.create(job_spec(_limits(cpu="4000m", memory="16Gi", **{"nvidia.com/gpu": "1"})), job_id="l4")
    rtx = job_spec(
        _limits(cpu="20", memory="80Gi", **{"nvidia.com/gpu": "1"}),
        node_selector={"accelerator": "nvidia-rtx-pro-6000"},
    )
    assert cloud.create(rtx | {"launch_stage": "BETA"}, job_id="rtx").generation == 1


def test_cpu_only_shapes_of_the_table_are_accepted(cloud):
    for cpu, memory in [
        ("1", "512Mi"),
        ("1", "4Gi"),
        ("2", "8Gi"),
        ("4", "2Gi"),
        ("6", "24Gi"),
        ("8", "32Gi"),
    ]:
        spec = job_spec(_limits(cpu=cpu, memory=memory), node_selector={})
        assert cloud.create(spec, job_id=f"cpu{cpu}-{memory.lower()}").generation == 1


def test_gpu_tasks_over_an_hour_need_the_preview_and_stop_at_12_hours(cloud):
    long_l4 = job_spec(timeout={"seconds": 12 * 3600}) | {"launch_stage": "BETA"}
    assert cloud.create(long_l4, job_id="long").template.template.timeout.total_seconds() == 12 * 3600
    # A CPU-only task may run up to 168 h at GA.
    cpu_only = job_spec(_limits(cpu="4", memory="16Gi"), node_selector={}, timeout={"seconds": 168 * 3600})
    assert cloud.create(cpu_only, job_id="cpu").launch_stage == launch_stage_pb2.LaunchStage.GA


def test_run_job_timeout_override_is_held_to_the_jobs_launch_stage(cloud):
    cloud.create()  # an L4 job at GA
    with pytest.raises(exceptions.InvalidArgument, match="one hour when using GPU"):
        cloud.jobs.run_job(request={"name": JOB, "overrides": {"timeout": {"seconds": 7200}}})
    cloud.create(job_spec() | {"launch_stage": "BETA"}, job_id="preview")
    preview = f"{PARENT}/jobs/preview"
    assert cloud.jobs.get_job(name=preview).launch_stage == launch_stage_pb2.LaunchStage.GA
    with pytest.raises(exceptions.InvalidArgument, match="one hour when using GPU"):
        cloud.jobs.run_job(request={"name": preview, "overrides": {"timeout": {"seconds": 7200}}})
    planned = cloud.jobs.run_job(
        request={"name": JOB, "overrides": {"timeout": {"seconds": 3600}}, "validate_only": True}
    ).result(polling=FAST)
    assert planned.template.timeout.total_seconds() == 3600


def test_launch_stage_on_read_is_the_stage_the_features_need(cloud):
    # ALPHA asked, only a BETA feature used (RTX PRO 6000): BETA on read.
    rtx = job_spec(
        _limits(cpu="20", memory="80Gi", **{"nvidia.com/gpu": "1"}),
        node_selector={"accelerator": "nvidia-rtx-pro-6000"},
    )
    assert (
        cloud.create(rtx | {"launch_stage": "ALPHA"}, job_id="rtx").launch_stage
        == launch_stage_pb2.LaunchStage.BETA
    )
    # BETA asked for an L4 job of 1 h: GA on read; over 1 h it is BETA.
    job = cloud.create(job_spec() | {"launch_stage": "BETA"})
    assert cloud.jobs.get_job(name=JOB).launch_stage == launch_stage_pb2.LaunchStage.GA
    longer = run_v2.Job(job)
    longer.template.template.timeout = {"seconds": 7200}
    longer.launch_stage = launch_stage_pb2.LaunchStage.BETA
    updated = cloud.jobs.update_job(job=longer).result(polling=FAST)
    assert updated.launch_stage == launch_stage_pb2.LaunchStage.BETA
    # The stored job sent back as read changes nothing.
    again = cloud.jobs.update_job(job=updated).result(polling=FAST)
    assert (again.generation, again.etag) == (updated.generation, updated.etag)


def test_bucket_in_another_region_is_a_failed_precondition(cloud):
    cloud.storage.create_bucket("elsewhere", location="us-central1")
    with pytest.raises(exceptions.FailedPrecondition, match="(?i)us-central1"):
        cloud.create(job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": "elsewhere"}}]))


def test_service_account_without_secret_access_is_denied(cloud):
    cloud.local.clients(PROJECT).iam.create_service_account(
        request={"name": f"projects/{PROJECT}", "account_id": "no-access"}
    )
    with pytest.raises(exceptions.PermissionDenied, match="secretAccessor"):
        cloud.create(job_spec(service_account=f"no-access@{PROJECT}.iam.gserviceaccount.com"))


# ---- Executions


def test_a_task_runs_as_the_jobs_service_account_found_through_the_metadata_server(cloud, image):
    cloud.create(job_spec({"args": ["whoami", BUCKET]}))
    execution = cloud.run()
    # storage.objects.list is the job account's (objectUser on the bucket); storage.buckets.get is not,
    # and Cloud Storage answers the task's own bucket GET with 403 naming that account.
    assert execution.failed_count == 1
    identity = json.loads(cloud.log_texts(execution.name)[0])
    assert identity == {"email": ACCOUNT, "project": PROJECT}
    errors = "\n".join(cloud.log_texts(execution.name, "stderr"))
    assert f"{ACCOUNT} does not have storage.buckets.get access" in errors


def test_a_mount_the_jobs_account_cannot_write_fails_the_task_before_it_starts(cloud, image, local):
    bucket = local.clients(PROJECT).storage.bucket(BUCKET)
    policy = bucket.get_iam_policy()
    policy.bindings = [{"role": "roles/storage.objectViewer", "members": {f"serviceAccount:{ACCOUNT}"}}]
    bucket.set_iam_policy(policy)
    cloud.create()
    execution = cloud.run()
    completed = next(c for c in execution.conditions if c.type_ == "Completed")
    assert completed.state == Condition.State.CONDITION_FAILED
    assert "Bad credentials for bucket" in completed.message
    assert "storage.objects.create" in completed.message
    # Read-only, the same grant is enough.
    cloud.jobs.delete_job(name=JOB).result(polling=FAST)
    readonly = job_spec(volumes=[{"name": "gcs", "gcs": {"bucket": BUCKET, "read_only": True}}])
    cloud.create(readonly)
    assert "Bad credentials" not in next(c for c in cloud.run().conditions if c.type_ == "Completed").message


def test_a_writable_mount_needs_object_access_on_the_bucket_not_storage_admin(cloud, image, local):
    # Cloud Run's page asks for roles/storage.admin for the service identity; gcsfuse's own page names
    # roles/storage.objectUser on the bucket for a read-write mount, which is what a task needs.
    bucket = local.clients(PROJECT).storage.bucket(BUCKET)
    policy = bucket.get_iam_policy()
    policy.bindings = [{"role": "roles/storage.objectUser", "members": {f"serviceAccount:{ACCOUNT}"}}]
    bucket.set_iam_policy(policy)
    cloud.create()
    execution = cloud.run()
    assert execution.succeeded_count == 1, execution.conditions
    assert bucket.blob("out/result.txt").download_as_text() == "written through the mount"


def test_a_non_root_image_needs_the_mounts_uid_to_write_to_it(cloud, image, local):
    config = json.loads((image / ".image.json").read_text())
    (image / ".image.json").write_text(json.dumps(config | {"user": "10001:10001"}))
    cloud.create()
    completed = next(c for c in cloud.run().conditions if c.type_ == "Completed")
    assert completed.state == Condition.State.CONDITION_FAILED
    assert "EACCES" in completed.message and "uid=10001" in completed.message
    owned = [{"name": "gcs", "gcs": {"bucket": BUCKET, "mount_options": ["uid=10001", "gid=10001"]}}]
    cloud.jobs.delete_job(name=JOB).result(polling=FAST)
    cloud.create(job_spec(volumes=owned))
    execution = cloud.run()
    assert execution.succeeded_count == 1, execution.conditions


def test_task_sees_overrides_builtin_env_secret_and_mount(cloud, image, local):
    cloud.create()
    overrides = {
        "container_overrides": [
            {
                "args": ["report", "/mnt/gcs/out/result.txt", "--model=/mnt/gcs/models/gemma"],
                "env": [
                    {"name": "LEARNING_RATE", "value": "1e-4"},
                    {"name": "MODEL_DIR", "value": "/mnt/gcs/m2"},
                ],
            }
        ],
        "task_count": 2,
    }
    execution = cloud.run(overrides)
    assert execution.succeeded_count == 2 and execution.failed_count == 0
    assert completed(execution).state == Condition.State.CONDITION_SUCCEEDED
    assert execution.completion_time and execution.start_time
    short = execution.name.rsplit("/", 1)[-1]
    assert short.startswith("trainer-") and len(short) == len("trainer-") + 5

    reports = sorted(
        (json.loads(line) for line in cloud.log_texts(execution.name)),
        key=lambda r: r["env"]["CLOUD_RUN_TASK_INDEX"],
    )
    assert [r["env"]["CLOUD_RUN_TASK_INDEX"] for r in reports] == ["0", "1"]
    bucket_dir = str(local.emulator.bucket_dir(BUCKET))
    report = reports[0]
    assert report["argv"] == [f"{bucket_dir}/out/result.txt", f"--model={bucket_dir}/models/gemma"]
    env = report["env"]
    assert env["CLOUD_RUN_JOB"] == "trainer"
    assert env["CLOUD_RUN_EXECUTION"] == short
    assert env["CLOUD_RUN_TASK_ATTEMPT"] == "0"
    assert env["CLOUD_RUN_TASK_COUNT"] == "2"
    assert env["HF_TOKEN"] == TOKEN
    assert env["LEARNING_RATE"] == "1e-4"
    assert env["MODEL_DIR"] == f"{bucket_dir}/m2"  # the override replaced the job's value
    assert env["FROM_IMAGE"] == "yes"
    assert env["PATH"] != "/opt/in/the/container"
    assert env["STORAGE_EMULATOR_HOST"] == local.emulator.storage_host

    # What the task wrote through the mount is an object of the bucket.
    blob = cloud.storage.bucket(BUCKET).blob("out/result.txt")
    assert blob.download_as_text() == "written through the mount"
    # The token is not in the request the job was created with: only a reference to the secret.
    create = next(entry for entry in local.record() if entry["method"] == "CreateJob")
    assert TOKEN not in json.dumps(create)

    tasks = list(cloud.tasks.list_tasks(parent=execution.name))
    assert [t.index for t in tasks] == [0, 1]
    assert tasks[0].name == f"{execution.name}/tasks/{short}-task0"
    assert tasks[1].last_attempt_result.exit_code == 0
    assert cloud.tasks.get_task(name=tasks[0].name).completion_time


def test_failed_task_is_retried_with_the_next_attempt_number(cloud, image):
    cloud.create(job_spec({"args": ["fail-first"]}, max_retries=1))
    execution = cloud.run()
    assert completed(execution).state == Condition.State.CONDITION_SUCCEEDED
    assert (execution.succeeded_count, execution.retried_count) == (1, 1)
    assert cloud.log_texts(execution.name) == ["attempt 0", "attempt 1"]
    system = cloud.log_texts(execution.name, "varlog%2Fsystem")
    assert "Container called exit(1)." in system
    assert any("retrying" in line for line in system)
    job = cloud.jobs.get_job(name=JOB)
    assert job.execution_count == 1
    assert job.latest_created_execution.name == execution.name
    assert (
        job.latest_created_execution.completion_status
        == run_v2.ExecutionReference.CompletionStatus.EXECUTION_SUCCEEDED
    )


def test_task_failing_every_attempt_fails_the_execution(cloud, image):
    cloud.create(job_spec({"args": ["fail"]}, max_retries=1))
    execution = cloud.run()
    condition = completed(execution)
    assert condition.state == Condition.State.CONDITION_FAILED
    assert condition.execution_reason == Condition.ExecutionReason.NON_ZERO_EXIT_CODE
    assert "exit code 3" in condition.message
    assert (execution.failed_count, execution.retried_count) == (1, 1)
    assert cloud.log_texts(execution.name, "stderr") == ["failing", "failing"]


def test_stdout_lines_reach_logging_with_the_execution_labels(cloud, image):
    cloud.create(job_spec({"args": []}))  # no args: the image's CMD
    execution = cloud.run()
    short = execution.name.rsplit("/", 1)[-1]
    entries = list(
        cloud.logging.list_log_entries(
            request={
                "resource_names": [f"projects/{PROJECT}"],
                "filter": f'labels."run.googleapis.com/execution_name"="{short}" AND severity=INFO',
            }
        )
    )
    stdout = [e for e in entries if e.log_name.endswith("run.googleapis.com%2Fstdout")]
    assert [e.text_payload for e in stdout] == ["line 0", "line 1", "line 2"]
    assert stdout[0].resource.type == "cloud_run_job"
    assert dict(stdout[0].resource.labels) == {
        "job_name": "trainer",
        "location": REGION,
        "project_id": PROJECT,
    }
    assert stdout[0].labels["run.googleapis.com/task_index"] == "0"
    assert stdout[0].labels["run.googleapis.com/task_attempt"] == "0"
    assert any(e.text_payload == f"Execution {short} has completed successfully." for e in entries)


def test_task_over_its_timeout_is_killed_and_fails(cloud, image):
    cloud.create(job_spec({"args": ["sleep-first"]}))
    execution = cloud.run({"timeout": {"seconds": 1}})
    assert execution.template.timeout.total_seconds() == 1
    condition = completed(execution)
    assert condition.state == Condition.State.CONDITION_FAILED
    assert "timeout" in condition.message
    assert execution.failed_count == 1


def test_cancel_execution_stops_its_tasks(cloud, image):
    cloud.create(job_spec({"args": ["sleep-first"]}))
    name = cloud.start()
    wait_until(lambda: cloud.executions.get_execution(name=name).running_count == 1)
    cloud.executions.cancel_execution(name=name).result(polling=FAST)
    wait_until(lambda: bool(cloud.executions.get_execution(name=name).completion_time))
    execution = cloud.executions.get_execution(name=name)
    assert completed(execution).execution_reason == Condition.ExecutionReason.CANCELLED
    assert execution.cancelled_count == 1 and execution.failed_count == 0
    with pytest.raises(exceptions.FailedPrecondition):
        cloud.executions.cancel_execution(name=name)


def test_killed_task_is_retried_and_succeeds(cloud, image, local):
    cloud.create(job_spec({"args": ["sleep-first"]}, max_retries=2))
    name = cloud.start()
    wait_until(lambda: "ready 0" in cloud.log_texts(name))
    assert local.emulator.services["run"].kill_task(name.rsplit("/", 1)[-1], 0)
    wait_until(lambda: bool(cloud.executions.get_execution(name=name).completion_time))
    execution = cloud.executions.get_execution(name=name)
    assert completed(execution).state == Condition.State.CONDITION_SUCCEEDED
    assert execution.retried_count == 1
    assert cloud.log_texts(name) == ["ready 0", "ready 1"]
    assert not local.emulator.services["run"].kill_task(name, 0)  # nothing runs any more


def test_list_executions_newest_first_and_delete(cloud, image):
    cloud.create(job_spec({"args": []}))
    first, second = cloud.run(), cloud.run()
    listed = [e.name for e in cloud.executions.list_executions(parent=JOB)]
    assert listed == [second.name, first.name]
    cloud.executions.delete_execution(name=first.name).result(polling=FAST)
    assert [e.name for e in cloud.executions.list_executions(parent=JOB)] == [second.name]
    with pytest.raises(exceptions.NotFound):
        cloud.executions.get_execution(name=first.name)


def test_emulator_shutdown_ends_running_tasks(cloud, image, local):
    cloud.create(job_spec({"args": ["sleep-first"]}))
    name = cloud.start()
    wait_until(lambda: cloud.executions.get_execution(name=name).running_count == 1)
    local.emulator.services["run"].shutdown()
    execution = cloud.executions.get_execution(name=name)
    assert execution.completion_time
    assert execution.cancelled_count == 1


def test_parallelism_one_runs_tasks_one_after_the_other(cloud, image):
    spec = job_spec({"args": []})
    spec["template"] |= {"task_count": 2, "parallelism": 1}
    cloud.create(spec)
    execution = cloud.run()
    assert (execution.parallelism, execution.succeeded_count) == (1, 2)
    first, second = cloud.tasks.list_tasks(parent=execution.name)
    assert second.start_time >= first.completion_time


def test_in_a_parallel_execution_a_task_completes_while_the_others_still_run(cloud, image):
    # What `logs --task I --follow` waits for: task I's own completion_time and Completed condition.
    spec = job_spec({"args": ["task-1-sleeps"]})
    spec["template"] |= {"task_count": 2, "parallelism": 2}
    cloud.create(spec)
    name = cloud.start()
    first = f"{name}/tasks/{name.rsplit('/', 1)[-1]}-task0"
    wait_until(lambda: bool(cloud.tasks.get_task(name=first).completion_time))
    done, running = cloud.tasks.list_tasks(parent=name)
    assert completed(done).state == Condition.State.CONDITION_SUCCEEDED
    assert running.start_time and not running.completion_time
    execution = cloud.executions.get_execution(name=name)
    assert not execution.completion_time
    assert (execution.succeeded_count, execution.running_count) == (1, 1)
    cloud.executions.cancel_execution(name=name).result(polling=FAST)
    wait_until(lambda: bool(cloud.tasks.list_tasks(parent=name).tasks[1].completion_time))
    assert "cancelled" in completed(cloud.tasks.list_tasks(parent=name).tasks[1]).message


def test_executions_left_running_by_a_stopped_emulator_are_failed(cloud, image, local):
    cloud.create(job_spec({"args": ["sleep-first"]}))
    operation = cloud.jobs.run_job(name=JOB)
    name = operation.metadata.name
    wait_until(lambda: cloud.executions.get_execution(name=name).running_count == 1)
    # What a restarted emulator builds over the same --data-dir.
    emulator = local.emulator
    services = emulator.services
    RunService(
        emulator.state,
        emulator.operations,
        access=emulator.access,
        iam=services["iam"],
        storage=services["storage"],
        secrets=services["secrets"],
        registry=services["registry"],
        builds=services["builds"],
        quotas=services["quotas"],
        logging=services["logging"],
        data_dir=emulator.data_dir,
    )
    execution = operation.result(polling=FAST)
    assert execution.completion_time
    assert completed(execution).state == Condition.State.CONDITION_FAILED
    assert "stopped" in completed(execution).message


# ---- GPU quota


def test_an_execution_over_the_gpu_quota_fails_without_running_a_task(cloud, image, local):
    local.emulator.services["quotas"].set_gpu_quota(0)
    cloud.create()
    execution = cloud.run()
    condition = completed(execution)
    assert condition.state == Condition.State.CONDITION_FAILED
    assert "Quota exceeded for total allowable count of GPUs per project per region" in condition.message
    assert "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion requested: 1 allowed: 0" in condition.message
    assert execution.failed_count == 1 and execution.succeeded_count == 0
    assert cloud.log_texts(execution.name) == []  # the task never started

    local.emulator.services["quotas"].set_gpu_quota(1)
    too_many = cloud.run({"task_count": 2})  # two tasks at once need two GPUs
    assert "requested: 2 allowed: 1" in completed(too_many).message


def test_running_gpu_tasks_hold_their_quota_until_they_end(cloud, image, local):
    local.emulator.services["quotas"].set_gpu_quota(1)
    cloud.create(job_spec({"args": ["sleep-first"]}))
    first = cloud.start()
    wait_until(lambda: cloud.executions.get_execution(name=first).running_count == 1)
    second = cloud.run()
    assert "requested: 2 allowed: 1" in completed(second).message
    cloud.executions.cancel_execution(name=first).result(polling=FAST)
    wait_until(lambda: bool(cloud.executions.get_execution(name=first).completion_time))
    # A CPU-only job needs no GPU quota at all.
    local.emulator.services["quotas"].set_gpu_quota(0)
    cpu_only = job_spec({"args": []}, node_selector={}, gpu_zonal_redundancy_disabled=False)
    cpu_only["template"]["template"]["containers"][0] |= _limits(cpu="1", memory="512Mi")
    cloud.create(cpu_only, job_id="cpu")
    operation = cloud.jobs.run_job(name=f"{PARENT}/jobs/cpu")
    assert completed(operation.result(polling=FAST)).state == Condition.State.CONDITION_SUCCEEDED


def test_a_gpu_task_insisting_on_cuda_runs_on_this_machines_cpu(cloud, image):
    cloud.create(job_spec({"args": ["report", "/mnt/gcs/out/result.txt", "--device", "cuda"]}))
    execution = cloud.run()
    assert execution.succeeded_count == 1
    argv = json.loads(cloud.log_texts(execution.name)[0])["argv"]
    assert argv[-2:] == ["--device", "cpu"]
    assert any(
        "runs on this machine's CPU" in line for line in cloud.log_texts(execution.name, "varlog%2Fsystem")
    )


# ---- the machine's own Python


def test_a_python_module_whose_imports_this_machine_lacks_fails_before_a_task_starts(
    cloud, image, monkeypatch
):
    """The emulator runs `python -m trainer` with its own Python: without the train extra, it says what
    to install instead of failing every attempt on an ImportError."""
    (image / "trainer").mkdir()
    (image / "trainer" / "__main__.py").write_text("import json\nimport torch\nfrom trainer import data\n")
    (image / "trainer" / "data.py").write_text("from PIL import Image\n")
    (image / ".image.json").write_text(json.dumps({"entrypoint": ["python", "-m", "trainer"], "cmd": []}))
    # None in sys.modules is Python's own "this module cannot be imported" (the import system's docs).
    monkeypatch.setitem(sys.modules, "torch", None)
    cloud.create(job_spec({"args": ["--train-size", "8"]}, max_retries=3))
    execution = cloud.run()
    assert completed(execution).state == Condition.State.CONDITION_FAILED
    assert execution.retried_count == 0
    assert cloud.log_texts(execution.name) == [] and cloud.log_texts(execution.name, "stderr") == []
    (system,) = [line for line in cloud.log_texts(execution.name, "varlog%2Fsystem") if "Error:" in line]
    error, hint = system.splitlines()
    assert error.startswith("Error: python -m trainer imports torch, which ")  # PIL is installed
    assert hint.startswith("Hint: Rehearsing runs the trainer on this machine") and "'.[train]'" in hint


@pytest.mark.parametrize("change", ["delete", "disable"])
def test_run_job_accepts_a_job_whose_account_is_gone_and_the_execution_fails_before_any_task(
    cloud, image, local, change
):
    # RunJob needs only run.jobs.run on the job (roles/run.invoker), not actAs: the account is checked when
    # the job is created or updated. Deleted or disabled since, it gets no access tokens, so no task of
    # the execution can start with its identity.
    cloud.create(job_spec({"args": ["whoami", BUCKET]}))
    iam = local.clients(PROJECT).iam
    name = f"projects/{PROJECT}/serviceAccounts/{ACCOUNT}"
    getattr(iam, f"{change}_service_account")(request={"name": name})
    execution = cloud.run()
    completed = next(c for c in execution.conditions if c.type_ == "Completed")
    assert completed.state == Condition.State.CONDITION_FAILED
    why = "does not exist" if change == "delete" else "is disabled"
    assert f"run as service account {ACCOUNT}, but service account {ACCOUNT} {why}" in completed.message
    assert execution.failed_count == 1 and execution.succeeded_count == 0
    assert cloud.log_texts(execution.name) == []  # the task never ran
    if change == "disable":
        iam.enable_service_account(request={"name": name})
        again = cloud.run()
        assert json.loads(cloud.log_texts(again.name)[0]) == {"email": ACCOUNT, "project": PROJECT}
