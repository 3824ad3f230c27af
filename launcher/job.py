"""The Cloud Run GPU job: Settings -> run_v2.Job, and create-or-update with a field diff (its executions
are launcher/executions.py's).

The bucket is mounted at MOUNT_PATH, so the trainer reads the staged weights and dataset and writes its
checkpoints and results there: a retried task resumes from the checkpoints of its own execution.

The staging job (`<job>-stage`, stage_job_spec) is its CPU-only sibling: the same image and service
account, running launcher.staging.worker with arguments given per execution (launcher/staging/in_cloud.py).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.api_core import exceptions
from google.cloud import artifactregistry_v1, run_v2
from google.protobuf import duration_pb2

from launcher import gpus
from launcher.changes import Change
from launcher.cloud import POLLING, RETRY, Clients
from launcher.errors import UserError
from launcher.overrides import apply as apply_settings
from launcher.settings import Settings

MOUNT_PATH = "/mnt/gcs"
VOLUME = "gcs"
CONTAINER = "trainer"
RUNS_PREFIX = "runs"
# The image runs as this user (Dockerfile: USER 10001:10001). gcsfuse gives every file of a mount to
# the user that mounted it, 0644/0755, unless told otherwise (gcsfuse docs/semantics.md, "Permissions
# and ownership"), and Volume.gcs.mount_options passes gcsfuse flags without their leading "--" (the
# proto comment of GCSVolumeSource.mount_options): uid/gid make the trainer the owner of the mount.
CONTAINER_UID = 10001
# gcsfuse options that suit large sequential weight reads and checkpoint writes, and the owner: each is a
# gcsfuse flag of long standing (v2.0 and before). Cloud Run documents neither which gcsfuse version it
# runs nor a list of the flags it passes on (https://cloud.google.com/run/docs/configuring/jobs/cloud-storage-volume-mounts),
# so a newer flag such as enable-buffered-read (gcsfuse v3.3.0 on) could keep a user's first task from
# mounting: it is left out until a job on Cloud Run shows it mounts. The file cache and its parallel
# downloads are not used: its cache directory would be in the task's memory, 55 GB at 27B.
MOUNT_OPTIONS = [
    "implicit-dirs",
    "metadata-cache-ttl-secs=-1",
    "file-cache-max-size-mb=0",
    f"uid={CONTAINER_UID}",
    f"gid={CONTAINER_UID}",
]

# The staging job: a short CPU job in the region that runs launcher.staging.worker from the same image,
# so Hub weights flow Hub -> region -> bucket instead of through the user's machine.
STAGE_SUFFIX = "-stage"
STAGE_CONTAINER = "stage"
STAGE_COMMAND = ["python", "-m", "launcher.staging.worker"]
STAGE_CPU = "4"
STAGE_MEMORY = "16Gi"
STAGE_RETRIES = 3
STAGE_TIMEOUT_S = 2 * 3600


def trainer_args(settings: Settings, model_prefix: str, dataset_prefix: str) -> list[str]:
    args = [
        "--model-id",
        f"{MOUNT_PATH}/{model_prefix}",
        "--dataset",
        f"{MOUNT_PATH}/{dataset_prefix}",
        "--output-dir",
        f"{MOUNT_PATH}/{RUNS_PREFIX}",
    ]
    if settings.uses_gpu:
        # The budget launcher.gpus was measured within: the trainer's default (85) is more than an L4 holds.
        args += ["--max-memory-gib", str(gpus.GPUS[settings.gpu].memory_gib)]
    # cuda, not auto, on a GPU job: an image whose torch cannot use the driver fails in seconds instead of
    # training on the CPU (docs/container.md).
    args += ["--device", "cuda" if settings.uses_gpu else "cpu"]
    return apply_settings(args, settings.trainer)


def staged_prefix(args: Sequence[str], flag: str) -> str | None:
    """The bucket prefix a trainer argument (--model-id, --dataset) reads through the mount, or None."""
    if flag not in args or args.index(flag) + 1 >= len(args):
        return None
    value = args[args.index(flag) + 1]
    return value.removeprefix(MOUNT_PATH + "/") if value.startswith(MOUNT_PATH + "/") else None


def _token_env(settings: Settings) -> run_v2.EnvVar:
    """HF_TOKEN from Secret Manager: the only way the token reaches a task."""
    return run_v2.EnvVar(
        name="HF_TOKEN",
        value_source=run_v2.EnvVarSource(
            secret_key_ref=run_v2.SecretKeySelector(secret=settings.secret_id, version="latest")
        ),
    )


def job_spec(settings: Settings, image_uri: str, args: list[str]) -> run_v2.Job:
    limits = {"cpu": settings.cpu, "memory": settings.memory}
    if settings.uses_gpu:
        limits["nvidia.com/gpu"] = "1"
    container = run_v2.Container(
        name=CONTAINER,
        image=image_uri,
        args=args,
        env=[_token_env(settings)],
        resources=run_v2.ResourceRequirements(limits=limits),
        volume_mounts=[run_v2.VolumeMount(name=VOLUME, mount_path=MOUNT_PATH)],
    )
    task = run_v2.TaskTemplate(
        containers=[container],
        volumes=[
            run_v2.Volume(
                name=VOLUME,
                gcs=run_v2.GCSVolumeSource(
                    bucket=settings.bucket, read_only=False, mount_options=MOUNT_OPTIONS
                ),
            )
        ],
        max_retries=settings.max_retries,
        timeout=duration_pb2.Duration(seconds=settings.task_timeout_s),
        service_account=settings.service_account_email,
    )
    if settings.uses_gpu:
        task.node_selector = run_v2.NodeSelector(accelerator=settings.gpu)
        task.gpu_zonal_redundancy_disabled = not settings.gpu_zonal_redundancy
    if settings.network:
        task.vpc_access = run_v2.VpcAccess(
            network_interfaces=[
                run_v2.VpcAccess.NetworkInterface(network=settings.network, subnetwork=settings.subnet)
            ],
            egress=(
                run_v2.VpcAccess.VpcEgress.ALL_TRAFFIC
                if settings.vpc_egress == "all-traffic"
                else run_v2.VpcAccess.VpcEgress.PRIVATE_RANGES_ONLY
            ),
        )
    return run_v2.Job(
        labels={"managed-by": "gemma-launch"},
        launch_stage=settings.launch_stage,
        template=run_v2.ExecutionTemplate(task_count=1, parallelism=1, template=task),
    )


def gcloud_command(settings: Settings, job: run_v2.Job, verb: str) -> str:
    task = job.template.template
    container = task.containers[0]
    parts = [
        "gcloud",
        "beta",
        "run",
        "jobs",
        verb,
        settings.job,
        f"--project={settings.project_id}",
        f"--region={settings.region}",
        f"--image={container.image}",
        f"--cpu={settings.cpu}",
        f"--memory={settings.memory}",
    ]
    if settings.uses_gpu:
        parts += [
            "--gpu=1",
            f"--gpu-type={settings.gpu}",
            "--no-gpu-zonal-redundancy" if task.gpu_zonal_redundancy_disabled else "--gpu-zonal-redundancy",
        ]
    parts += [
        f"--max-retries={task.max_retries}",
        f"--task-timeout={settings.task_timeout_s}s",
        f"--service-account={settings.service_account_email}",
        f"--set-secrets=HF_TOKEN={settings.secret_id}:latest",
        f"--add-volume=name={VOLUME},type=cloud-storage,bucket={settings.bucket}",
        f"--add-volume-mount=volume={VOLUME},mount-path={MOUNT_PATH}",
    ]
    if settings.network:
        parts += [f"--network={settings.network}", f"--vpc-egress={settings.vpc_egress}"]
        if settings.subnet:
            parts.append(f"--subnet={settings.subnet}")
    parts.append("--args=" + ",".join(container.args))
    return shlex.join(parts)


def stage_settings(settings: Settings) -> Settings:
    """The same settings, naming the staging job (`<job>-stage`) instead of the GPU job."""
    return settings.model_copy(update={"job": settings.job + STAGE_SUFFIX})


def stage_job_spec(settings: Settings, image_uri: str, env: Mapping[str, str]) -> run_v2.Job:
    """The staging job: no GPU, no volume (it writes through the Storage API), no VPC (it needs the Hub).

    `env` holds plain variables only (e.g. HF_ENDPOINT for a Hub mirror); the token comes from the secret.
    """
    container = run_v2.Container(
        name=STAGE_CONTAINER,
        image=image_uri,
        command=STAGE_COMMAND,
        env=[_token_env(settings)] + [run_v2.EnvVar(name=name, value=value) for name, value in env.items()],
        resources=run_v2.ResourceRequirements(limits={"cpu": STAGE_CPU, "memory": STAGE_MEMORY}),
    )
    task = run_v2.TaskTemplate(
        containers=[container],
        max_retries=STAGE_RETRIES,
        timeout=duration_pb2.Duration(seconds=STAGE_TIMEOUT_S),
        service_account=settings.service_account_email,
    )
    return run_v2.Job(
        labels={"managed-by": "gemma-launch"},
        launch_stage="GA",
        template=run_v2.ExecutionTemplate(task_count=1, parallelism=1, template=task),
    )


def stage_gcloud_command(settings: Settings, job: run_v2.Job, verb: str) -> str:
    """`settings` as stage_settings() returns them."""
    container = job.template.template.containers[0]
    parts = [
        "gcloud",
        "run",
        "jobs",
        verb,
        settings.job,
        f"--project={settings.project_id}",
        f"--region={settings.region}",
        f"--image={container.image}",
        "--command=" + ",".join(container.command),
        f"--cpu={STAGE_CPU}",
        f"--memory={STAGE_MEMORY}",
        f"--max-retries={STAGE_RETRIES}",
        f"--task-timeout={STAGE_TIMEOUT_S}s",
        f"--service-account={settings.service_account_email}",
        f"--set-secrets=HF_TOKEN={settings.secret_id}:latest",
    ]
    plain = [f"{var.name}={var.value}" for var in container.env if var.value]
    if plain:
        parts.append("--set-env-vars=" + ",".join(plain))
    return shlex.join(parts)


def _is_subset(wanted: Any, actual: Any) -> bool:
    """True when every field we set has the same value on the server (which may add defaults)."""
    if isinstance(wanted, dict):
        return isinstance(actual, dict) and all(_is_subset(v, actual.get(k)) for k, v in wanted.items())
    if isinstance(wanted, list):
        return (
            isinstance(actual, list)
            and len(wanted) == len(actual)
            and all(_is_subset(w, a) for w, a in zip(wanted, actual, strict=True))
        )
    return wanted == actual


def spec_dict(job: run_v2.Job) -> dict[str, Any]:
    """The job as its JSON form shows it: proto field names, enums by name ("launch_stage": "BETA")."""
    return run_v2.Job.to_dict(job, always_print_fields_with_no_presence=False, use_integers_for_enums=False)


def _managed_fields(job: run_v2.Job) -> dict[str, Any]:
    as_dict = spec_dict(job)
    return {key: as_dict.get(key) for key in ("labels", "launch_stage", "template")}


def field_diff(wanted: Any, actual: Any, path: str = "") -> list[str]:
    """ "path: before -> after" for each field we set that differs on the server (fields the server
    added are not differences); a list of messages is compared item by item, any other list whole."""
    if isinstance(wanted, dict):
        actual = actual if isinstance(actual, dict) else {}
        return [
            line
            for key, value in wanted.items()
            for line in field_diff(value, actual.get(key), f"{path}.{key}" if path else key)
        ]
    if (
        isinstance(wanted, list)
        and isinstance(actual, list)
        and len(wanted) == len(actual)
        and all(isinstance(item, dict) for item in wanted)
    ):
        return [
            line
            for index, (item, found) in enumerate(zip(wanted, actual, strict=True))
            for line in field_diff(item, found, f"{path}[{index}]")
        ]
    if _is_subset(wanted, actual):
        return []
    return [f"{path}: {_shown(actual)} -> {_shown(wanted)}"]


def _shown(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value, separators=(", ", ": "))


def ensure_job(
    clients: Clients,
    settings: Settings,
    job: run_v2.Job,
    *,
    dry_run: bool = False,
    describe: Callable[[Settings, run_v2.Job, str], str] = gcloud_command,
    kind: str = "job",
) -> Change:
    """Create the job, or update it when a field we manage differs; an unchanged spec is not rewritten.

    `describe(settings, job, verb)` gives the equivalent gcloud command shown to the user (none when
    unchanged); `kind` names the job in the Change ("job", "staging job").
    """
    try:
        existing = clients.jobs.get_job(name=settings.job_name, retry=RETRY)
    except exceptions.NotFound:
        existing = None
    if existing is None:
        command = describe(settings, job, "create")
        if dry_run:
            return Change(kind, settings.job_name, "would create", command)
        try:
            clients.jobs.create_job(
                parent=settings.location, job=job, job_id=settings.job, retry=RETRY
            ).result(timeout=300, retry=RETRY, polling=POLLING)
        except exceptions.AlreadyExists:
            # Another `up`, or our own create whose reply was lost: converge with an update below.
            return ensure_job(clients, settings, job, dry_run=dry_run, describe=describe, kind=kind)
        return Change(kind, settings.job_name, "created", command)
    command = describe(settings, job, "update")
    wanted, actual = _managed_fields(job), spec_dict(existing)
    diff = tuple(field_diff(wanted, {key: actual.get(key) for key in wanted}))
    if not diff:
        return Change(kind, settings.job_name, "unchanged")
    if dry_run:
        return Change(kind, settings.job_name, "would update", command, diff)
    update = run_v2.Job(job)
    update.name = settings.job_name
    clients.jobs.update_job(job=update, retry=RETRY).result(timeout=300, retry=RETRY, polling=POLLING)
    return Change(kind, settings.job_name, "updated", command, diff)


def exists(clients: Clients, settings: Settings) -> bool:
    try:
        clients.jobs.get_job(name=settings.job_name, retry=RETRY)
    except exceptions.NotFound:
        return False
    return True


def current_job(clients: Clients, settings: Settings) -> run_v2.Job:
    try:
        return clients.jobs.get_job(name=settings.job_name, retry=RETRY)
    except exceptions.NotFound:
        raise UserError(
            f"Job {settings.job} does not exist in {settings.region}.", "Run `gemma-launch up` first."
        ) from None


def check_gpu(job: run_v2.Job, settings: Settings) -> None:
    """The settings' GPU (and its zonal redundancy) is the job's. `run` and `sweep` read the quota of the
    settings' GPU before they start an execution, which runs on the job's: a --gpu or a gemma-launch.toml
    changed since `up` would check one quota (--gpu none: none at all) while Cloud Run asks another."""
    task = job.template.template
    gpu = task.node_selector.accelerator or "none"
    zonal = gpu != "none" and not task.gpu_zonal_redundancy_disabled
    asked = settings.uses_gpu and settings.gpu_zonal_redundancy
    if (gpu, zonal) == (settings.gpu, asked):
        return
    wanted = settings.gpu + (" with zonal redundancy" if asked else "")
    flags = f"--gpu {gpu}" + ("" if gpu == "none" else f" --{'' if zonal else 'no-'}zonal-redundancy")
    raise UserError(
        f"Job {settings.job} runs on {gpu}{' with zonal redundancy' if zonal else ''}, not {wanted}: an "
        "execution runs on the job's GPU, as `up` made it.",
        f"Run `gemma-launch up` with these settings to move the job to {wanted}, or start the execution "
        f"with the job's: {flags}.",
    )


def check_bucket(job: run_v2.Job, settings: Settings) -> None:
    """The settings' bucket is the one the job mounts: `run` and `sweep` read the staged dataset's splits
    and the earlier runs' rates there, and a bucket named to `up` alone (--bucket) would otherwise check
    another bucket's dataset, or none, before the job reads its own."""
    mounted = [volume.gcs.bucket for volume in job.template.template.volumes if volume.name == VOLUME]
    if not mounted or mounted[0] == settings.bucket:
        return
    raise UserError(
        f"Job {settings.job} reads bucket gs://{mounted[0]}, not gs://{settings.bucket}: the settings name "
        "another bucket than `up` gave the job.",
        f'Pass --bucket {mounted[0]}, or set BUCKET_NAME={mounted[0]} or bucket = "{mounted[0]}" in '
        "gemma-launch.toml so that every command finds it.",
    )


def require_service_account(clients: Clients, settings: Settings, job: run_v2.Job) -> None:
    """Refuse to start an execution whose account was deleted or disabled after `up`: its tasks could
    not act as it.

    Cloud Run checks the account only when a job is created or updated (actAs on the account as a
    resource, https://cloud.google.com/run/docs/configuring/jobs/service-accounts), so a change after
    that goes unnoticed until the execution fails: an account deleted or disabled gets no access tokens
    (https://cloud.google.com/iam/docs/reference/rest/v1/projects.serviceAccounts/disable), and no task
    can start as it. A caller who may not read accounts is not stopped: the execution shows what happens.
    """
    account = job.template.template.service_account
    if not account.endswith(".iam.gserviceaccount.com"):
        return
    try:
        found = clients.iam.get_service_account(
            name=f"projects/{settings.project_id}/serviceAccounts/{account}", retry=RETRY
        )
    except exceptions.NotFound:
        raise UserError(
            f"Job {settings.job} runs as service account {account}, which no longer exists (deleted after "
            "`gemma-launch up`).",
            "Run `gemma-launch up` to create it again and grant its roles, then run this again.",
        ) from None
    except exceptions.PermissionDenied:
        return
    if found.disabled:
        raise UserError(
            f"Job {settings.job} runs as service account {account}, which is disabled: no task can start "
            "as it.",
            enable_hint([account], settings.project_id) + ", then run this again.",
        )


def enable_hint(emails: Sequence[str], project: str) -> str:
    """How to enable disabled accounts again. `up` does not: disabling an account is how an administrator
    cuts it off, while investigating it or before deleting it (IAM's advice), and is theirs to undo."""
    commands = " and ".join(
        f"`gcloud iam service-accounts enable {email} --project {project}`" for email in emails
    )
    they, them, were = ("it", "it", "was") if len(emails) == 1 else ("they", "them", "were")
    return (
        f"`gemma-launch up` does not enable an account someone disabled: if {they} {were} not disabled on "
        f"purpose, enable {them} with {commands}"
    )


def job_args(job: run_v2.Job) -> list[str]:
    """The trainer arguments the job's executions run with, unless overridden."""
    return list(job.template.template.containers[0].args)


def current_args(clients: Clients, settings: Settings) -> list[str]:
    return job_args(current_job(clients, settings))


def check_fits(job: run_v2.Job, sets: Mapping[str, str]) -> str | None:
    """The job's GPU, model and weights as an execution with `sets` would run them, checked against
    launcher.gpus: a UserError for a combination that cannot run, a line to show for one that runs slowly
    or was not measured."""
    task = job.template.template
    args = apply_settings(list(task.containers[0].args), sets)
    model = _flag(args, "--model-id")
    if model is None:
        return None
    return gpus.check(task.node_selector.accelerator, model, _flag(args, "--quantization") or "auto", "run")


def _flag(args: Sequence[str], flag: str) -> str | None:
    index = args.index(flag) if flag in args else -1
    return args[index + 1] if 0 <= index < len(args) - 1 else None


def current_image(clients: Clients, settings: Settings) -> str | None:
    try:
        return clients.jobs.get_job(name=settings.job_name, retry=RETRY).template.template.containers[0].image
    except exceptions.NotFound:
        return None


def latest_image(clients: Clients, settings: Settings) -> str | None:
    """The image tagged latest in the repository (by digest), the last one `up` built; None when none."""
    prefix = settings.image_repository_uri + "@"
    try:
        for image in clients.registry.list_docker_images(
            request=artifactregistry_v1.ListDockerImagesRequest(parent=settings.repository_name), retry=RETRY
        ):
            if image.uri.startswith(prefix) and "latest" in image.tags:
                return image.uri
    except exceptions.NotFound:
        pass
    return None
