"""Cloud Run's rules for a job's spec, checked before anything is looked up, and the defaults it fills.

Each limit cites the Cloud Run page it comes from. RunService (run_api.py) applies them on CreateJob,
UpdateJob and RunJob (whose overrides are held to the same rules).
"""

from __future__ import annotations

import re
from typing import Any

from google.api import launch_stage_pb2
from google.cloud import run_v2
from google.protobuf import duration_pb2

from launcher.emulator.labels import check_labels
from launcher.emulator.rpc import invalid
from launcher.emulator.storage import bucket_name_ok

_ENV_NAME = re.compile(r"^[^=\s]+$")
# The proto comments of google.cloud.run.v2.EnvVar: the name "Must not exceed 32768 characters", the
# value's "maximum length is 32768 bytes"; https://cloud.google.com/run/docs/configuring/jobs/environment-variables:
# "a maximum of 1000 environment variables per container".
_ENV_MAX_LENGTH = 32768
_ENV_MAX_COUNT = 1000
# Container.name "specified as a DNS_LABEL (RFC 1123)" (proto comment of google.cloud.run.v2.Container).
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")
_CPU = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<milli>m?)$")
_MEMORY = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<unit>Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEMORY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_MEMORY_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}

RESERVED_ENV = ("CLOUD_RUN_JOB", "CLOUD_RUN_EXECUTION", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_ATTEMPT")
RESERVED_ENV += ("CLOUD_RUN_TASK_COUNT",)
_RESERVED_LABEL_PREFIXES = ("run.googleapis.com", "cloud.googleapis.com", "serving.knative.dev")
_RESERVED_LABEL_PREFIXES += ("autoscaling.knative.dev",)
GPU_LIMIT = "nvidia.com/gpu"
# accelerator -> (minimum CPUs, minimum memory in bytes, needs a preview launch stage)
# https://cloud.google.com/run/docs/configuring/jobs/gpu ("Supported GPU types"): L4 at least 4 CPU and
# 16 GiB; RTX PRO 6000 (Preview) at least 20 CPU and 80 GiB.
GPU_MINIMUMS = {"nvidia-l4": (4.0, 16 * 2**30, False), "nvidia-rtx-pro-6000": (20.0, 80 * 2**30, True)}
# The RTX PRO 6000 shapes Cloud Run accepts, which the docs leave out: 20 or 22 vCPU ("Must be equal to one
# of 20.0, 22.0") and 80 GiB up to 4 GiB per vCPU, as Cloud Run's validateOnly verdicts answer them.
RTX_CPUS = (20.0, 22.0)
RTX_GIB_PER_CPU = 4
Stage = launch_stage_pb2.LaunchStage
_PREVIEW_STAGES = (Stage.ALPHA, Stage.BETA)
_DEFAULT_RETRIES = 3
_DEFAULT_TIMEOUT_S = 600
# https://cloud.google.com/run/docs/configuring/task-timeout: up to 168 hours; "For tasks using GPUs, the
# maximum available timeout is 12 hours (preview)" ("Long running GPU jobs"), 1 hour at GA.
_MAX_TIMEOUT_S = 168 * 3600
MAX_GPU_TIMEOUT_S = 12 * 3600
GA_GPU_TIMEOUT_S = 3600
# https://cloud.google.com/run/docs/configuring/jobs/cpu: a job takes 1, 2, 4, 6 or 8 vCPU ("You must set a
# minimum of 1 CPU for a Cloud Run job"; "Values greater than 1 must be integer values"; at most 8 vCPU),
# each with the memory range of its row ("vCPU and memory table"), 512 MiB at least in the second
# generation (https://cloud.google.com/run/docs/configuring/jobs/memory-limits), 32 GiB at most.
JOB_MEMORY_RANGES = {
    1.0: (512 * 2**20, 4 * 2**30),
    2.0: (512 * 2**20, 8 * 2**30),
    4.0: (2 * 2**30, 16 * 2**30),
    6.0: (4 * 2**30, 24 * 2**30),
    8.0: (4 * 2**30, 32 * 2**30),
}
MAX_TASKS = 10_000
# https://cloud.google.com/run/docs/configuring/jobs/cloud-storage-volume-mounts ("Disallowed paths"):
# "Cloud Run does not allow you to mount a volume at /dev, /proc and /sys, or on their subdirectories."
_DISALLOWED_MOUNT_PATHS = ("/dev", "/proc", "/sys")


def parse_cpu(value: str) -> float:
    """CPU as Kubernetes writes it: "4", "0.5", "4000m"."""
    match = _CPU.match(value)
    if not match:
        raise invalid(f'Invalid CPU limit {value!r}: use a number of CPUs ("4") or millicpu ("4000m").')
    return float(match["value"]) / (1000 if match["milli"] else 1)


def parse_memory(value: str) -> int:
    """Memory in bytes, Kubernetes quantity rules: "16Gi" is 16 * 2**30, "16G" is 16 * 10**9."""
    match = _MEMORY.match(value)
    if not match:
        raise invalid(f'Invalid memory limit {value!r}: use e.g. "512Mi" or "16Gi".')
    return int(float(match["value"]) * _MEMORY_UNITS[match["unit"] or ""])


def duration_seconds(duration: Any) -> float:
    return duration.total_seconds() if hasattr(duration, "total_seconds") else float(duration)


def uses_gpu(task: run_v2.TaskTemplate) -> bool:
    return bool(task.node_selector.accelerator) or any(
        GPU_LIMIT in c.resources.limits for c in task.containers
    )


def feature_stage(job: run_v2.Job) -> int:
    """The launch stage the job's features need: BETA for a preview GPU or a GPU timeout over 1 h, else GA."""
    task = job.template.template
    if GPU_MINIMUMS.get(task.node_selector.accelerator, (0, 0, False))[2]:
        return Stage.BETA
    if uses_gpu(task) and duration_seconds(task.timeout) > GA_GPU_TIMEOUT_S:
        return Stage.BETA
    return Stage.GA


def normalize(job: run_v2.Job) -> None:
    """The job as Cloud Run stores it, so a spec sent twice compares equal to the stored one.

    Job.launch_stage "On read (or output), describes whether the resource uses preview features" (proto
    comment of google.cloud.run.v2.Job.launch_stage): what is stored is the stage the features need, not
    the one asked for (validate_template has held the request to it).
    """
    fill_defaults(job)
    job.launch_stage = feature_stage(job)


def fill_defaults(job: run_v2.Job) -> None:
    """The defaults Cloud Run fills."""
    if not job.template.task_count:
        job.template.task_count = 1
    task = job.template.template
    if "max_retries" not in task:
        task.max_retries = _DEFAULT_RETRIES
    if not duration_seconds(task.timeout):
        task.timeout = duration_pb2.Duration(seconds=_DEFAULT_TIMEOUT_S)
    for container in task.containers:
        container.resources.limits.setdefault("cpu", "1000m")
        container.resources.limits.setdefault("memory", "512Mi")


def validate_template(job: run_v2.Job) -> None:
    """The checks Cloud Run makes on the spec itself (INVALID_ARGUMENT), before looking anything up."""
    for key in list(job.labels) + list(job.template.labels):
        if key.split("/")[0].endswith(_RESERVED_LABEL_PREFIXES):
            raise invalid(f"Label {key!r} uses a reserved namespace; Cloud Run API v2 rejects it.")
    # "Only valid Google Cloud labels can be used on Cloud Run"
    # (https://cloud.google.com/run/docs/configuring/jobs/labels), on the job and its template alike.
    check_labels(job.labels, "A job")
    check_labels(job.template.labels, "A job's execution template")
    # Job.launch_stage proto comment: "Cloud Run supports ALPHA, BETA, and GA".
    if job.launch_stage not in (Stage.LAUNCH_STAGE_UNSPECIFIED, Stage.ALPHA, Stage.BETA, Stage.GA):
        raise invalid(
            f"launch_stage {Stage.Name(job.launch_stage)}: only ALPHA, BETA, GA, or unspecified are "
            "supported."
        )
    template = job.template
    if not 1 <= template.task_count <= MAX_TASKS:
        raise invalid(f"task_count must be between 1 and {MAX_TASKS}, got {template.task_count}.")
    if template.parallelism < 0:
        raise invalid(f"parallelism must not be negative, got {template.parallelism}.")
    # https://cloud.google.com/run/docs/configuring/parallelism: "an integer between 0 and the maximum
    # number of tasks running in parallel allowed by quota that don't exceed the number of tasks".
    if template.parallelism > template.task_count:
        raise invalid(
            "spec.template.spec.parallelism: Invalid value specified for parallelism. Must not exceed the "
            f"number of tasks ({template.task_count}), got {template.parallelism}."
        )
    task = template.template
    # "Cloud Run jobs only use the second generation execution environment, and this cannot be changed
    # for jobs" (https://cloud.google.com/run/docs/about-execution-environments); that environment is also
    # the one with network file system support, which a Cloud Storage volume is.
    if task.execution_environment == run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN1:
        raise invalid(
            "execution_environment EXECUTION_ENVIRONMENT_GEN1: Cloud Run jobs run only in the second "
            "generation execution environment."
        )
    if not 0 <= task.max_retries <= 10:
        raise invalid(f"max_retries must be between 0 and 10, got {task.max_retries}.")
    validate_timeout(task.timeout, uses_gpu(task), job.launch_stage)
    if not task.containers:
        raise invalid("The job's task template must have at least one container.")
    volumes = {}
    for volume in task.volumes:
        if volume.name in volumes:
            raise invalid(f"Volume name {volume.name!r} is used twice.")
        if "gcs" in volume:
            _validate_gcs_volume(volume)
        volumes[volume.name] = volume
    for number, container in enumerate(task.containers):
        where = f"containers[{number}]"
        if not container.image:
            raise invalid(f"{where}.image: a container image is required.")
        if container.name and not _DNS_LABEL.match(container.name):
            raise invalid(
                f"{where}.name: {container.name!r} must be a DNS label (RFC 1123): at most 63 lower-case "
                "letters, digits and hyphens, starting and ending with a letter or digit."
            )
        validate_env(container.env, where)
        paths = set()
        for mount in container.volume_mounts:
            if mount.name not in volumes:
                raise invalid(
                    f"{where}.volume_mounts: volume {mount.name!r} is not declared in the template."
                )
            # VolumeMount.mount_path proto comment: "Must not contain ':'".
            if ":" in mount.mount_path:
                raise invalid(f"{where}.volume_mounts: mount path {mount.mount_path!r} must not contain ':'.")
            if not mount.mount_path.startswith("/") or mount.mount_path in paths:
                raise invalid(
                    f"{where}.volume_mounts: mount path {mount.mount_path!r} must be absolute and unique."
                )
            if any(
                mount.mount_path.rstrip("/") == path or mount.mount_path.startswith(path + "/")
                for path in _DISALLOWED_MOUNT_PATHS
            ):
                raise invalid(
                    f"{where}.volume_mounts: mount path {mount.mount_path!r} is not allowed: Cloud Run does "
                    "not mount volumes at /dev, /proc or /sys, or below them."
                )
            paths.add(mount.mount_path)
    _validate_gpu(job)
    for number, container in enumerate(task.containers):
        _validate_resources(container, number, task.node_selector.accelerator)


def _validate_gcs_volume(volume: run_v2.Volume) -> None:
    """A Cloud Storage volume: a bucket by its name, and gcsfuse flags as the proto asks for them."""
    bucket = volume.gcs.bucket
    if not bucket:
        raise invalid(f"Volume {volume.name!r}: gcs.bucket is required.")
    # GCSVolumeSource.bucket is a "Cloud Storage Bucket name" (run_v2 proto): the bucket itself, named
    # by Cloud Storage's rules (https://cloud.google.com/storage/docs/buckets#naming), not a gs:// URL
    # or a path inside it.
    if not bucket_name_ok(bucket):
        raise invalid(
            f"Volume {volume.name!r}: gcs.bucket {bucket!r} is not a Cloud Storage bucket name (3-63 "
            "lower-case letters, digits, '-', '_' and '.'; no gs:// and no path)."
        )
    # GCSVolumeSource.mount_options: "A list of additional flags to pass to the gcsfuse CLI. Options
    # should be specified without the leading \"--\"" (run_v2 proto).
    for option in volume.gcs.mount_options:
        if not option or option.startswith("-") or any(c.isspace() for c in option):
            raise invalid(
                f"Volume {volume.name!r}: mount option {option!r} is not a gcsfuse flag as Cloud Run takes "
                'it: one flag per entry, without the leading "--" (e.g. "implicit-dirs", "uid=1000").'
            )


def validate_timeout(timeout: Any, gpu: bool, stage: int) -> None:
    """Task timeout limits (task-timeout page): 168 h; with a GPU 1 h at GA, 12 h as a Preview."""
    seconds = duration_seconds(timeout)
    if not 0 < seconds <= _MAX_TIMEOUT_S:
        raise invalid(f"Task timeout must be more than 0 s and at most 168 h, got {seconds:g} s.")
    if gpu and seconds > MAX_GPU_TIMEOUT_S:
        raise invalid(
            f"Invalid task timeout {seconds:g}s: the maximum is {MAX_GPU_TIMEOUT_S}s (12 hours) when using "
            "GPU."
        )
    if gpu and seconds > GA_GPU_TIMEOUT_S and stage not in _PREVIEW_STAGES:
        raise invalid(
            f"Invalid task timeout {seconds:g}s: the maximum allowed time is one hour when using GPU. "
            "The feature Long running GPU jobs is not supported in the declared launch stage. The launch "
            "stage should be specified at least as BETA."
        )


def _gib(size: int) -> str:
    return f"{size // 2**30}Gi" if size % 2**30 == 0 else f"{size // 2**20}Mi"


def _validate_resources(container: run_v2.Container, number: int, accelerator: str) -> None:
    """A container's CPU and memory against Cloud Run's shapes for jobs (see JOB_MEMORY_RANGES, RTX_CPUS)."""
    where = f"spec.template.spec.containers[{number}].resources.limits"
    cpu = parse_cpu(container.resources.limits.get("cpu", "1"))
    memory = parse_memory(container.resources.limits.get("memory", "512Mi"))
    if accelerator == "nvidia-rtx-pro-6000" and GPU_LIMIT in container.resources.limits:
        if cpu not in RTX_CPUS:
            raise invalid(
                f"{where}.cpu: Invalid value specified for cpu. Must be equal to one of 20.0, 22.0 with "
                f"nvidia-rtx-pro-6000, got {cpu:g}."
            )
        high = int(cpu) * RTX_GIB_PER_CPU * 2**30
        if not GPU_MINIMUMS[accelerator][1] <= memory <= high:
            raise invalid(
                f"{where}.memory: Invalid value specified for container memory. For {cpu:.1f} CPU with "
                f"nvidia-rtx-pro-6000, memory must be between 80Gi and {_gib(high)} inclusive."
            )
        return
    if cpu < 1:
        raise invalid(
            f"{where}.cpu: Invalid value specified for cpu. Total cpu < 1 is not supported with gen2 "
            "execution environment."
        )
    if cpu not in JOB_MEMORY_RANGES:
        raise invalid(f"{where}.cpu: Invalid value specified for cpu. Must be equal to one of 1, 2, 4, 6, 8.")
    low, high = JOB_MEMORY_RANGES[cpu]
    if not low <= memory <= high:
        raise invalid(
            f"{where}.memory: Invalid value specified for container memory. For {cpu:.1f} CPU, memory must "
            f"be between {_gib(low)} and {_gib(high)} inclusive."
        )


def validate_env(env: Any, where: str) -> None:
    if len(env) > _ENV_MAX_COUNT:
        raise invalid(
            f"{where}.env: {len(env)} environment variables; a container takes at most {_ENV_MAX_COUNT}."
        )
    seen = set()
    for var in env:
        if not _ENV_NAME.match(var.name) or len(var.name) > _ENV_MAX_LENGTH:
            raise invalid(f"{where}.env: invalid variable name {var.name[:64]!r}.")
        if len(var.value.encode()) > _ENV_MAX_LENGTH:
            raise invalid(
                f"{where}.env: the value of {var.name} is {len(var.value.encode())} bytes; the maximum is "
                f"{_ENV_MAX_LENGTH}."
            )
        if var.name in seen:
            raise invalid(f"{where}.env: variable {var.name!r} is set twice.")
        if var.name in RESERVED_ENV:
            raise invalid(f"{where}.env: {var.name} is reserved; Cloud Run sets it in every task.")
        if "value_source" in var and (var.value or not var.value_source.secret_key_ref.secret):
            raise invalid(
                f"{where}.env: {var.name} needs either a value or a secret_key_ref.secret, not both."
            )
        seen.add(var.name)


def _validate_gpu(job: run_v2.Job) -> None:
    task = job.template.template
    accelerator = task.node_selector.accelerator
    gpu_containers = [c for c in task.containers if GPU_LIMIT in c.resources.limits]
    for container in gpu_containers:
        if container.resources.limits[GPU_LIMIT] != "1":
            raise invalid(
                f"Invalid {GPU_LIMIT} limit {container.resources.limits[GPU_LIMIT]!r}: "
                "Cloud Run supports exactly 1 GPU per instance."
            )
    if gpu_containers and not accelerator:
        raise invalid(
            f"A {GPU_LIMIT} limit needs node_selector.accelerator (nvidia-l4 or nvidia-rtx-pro-6000)."
        )
    if not accelerator:
        return
    if accelerator not in GPU_MINIMUMS:
        raise invalid(f"Unsupported accelerator {accelerator!r}: use one of {', '.join(GPU_MINIMUMS)}.")
    if not gpu_containers:
        raise invalid(
            f"node_selector.accelerator {accelerator!r} needs a container with a {GPU_LIMIT}: 1 limit."
        )
    min_cpu, min_memory, preview = GPU_MINIMUMS[accelerator]
    for container in gpu_containers:
        cpu = parse_cpu(container.resources.limits.get("cpu", "1"))
        memory = parse_memory(container.resources.limits.get("memory", "512Mi"))
        if cpu < min_cpu or memory < min_memory:
            raise invalid(
                f"With {accelerator}, CPU must be at least {min_cpu:g}; memory must be at least "
                f"{min_memory // 2**30}Gi. The container asks for {cpu:g} CPU and {memory / 2**30:.3g} GiB."
            )
    if preview and job.launch_stage not in _PREVIEW_STAGES:
        raise invalid(
            f"The feature accelerator {accelerator!r} is not supported in the declared launch stage on "
            f"resource {job.name}. The launch stage should be specified at least as BETA."
        )


def apply_overrides(task: run_v2.TaskTemplate, overrides: run_v2.RunJobRequest.Overrides) -> None:
    for number, override in enumerate(overrides.container_overrides):
        where = f"overrides.container_overrides[{number}]"
        if override.name:
            matching = [c for c in task.containers if c.name == override.name]
            if not matching:
                raise invalid(f"{where}: the job has no container named {override.name!r}.")
            container = matching[0]
        elif len(task.containers) == 1:
            container = task.containers[0]
        else:
            raise invalid(f"{where}: name is required when the job has several containers.")
        validate_env(override.env, where)
        if override.clear_args:
            container.args = []
        if override.args:
            container.args = list(override.args)
        env = {var.name: run_v2.EnvVar(var) for var in container.env}
        env.update({var.name: run_v2.EnvVar(var) for var in override.env})
        container.env = list(env.values())
    if "timeout" in overrides:
        task.timeout = overrides.timeout
