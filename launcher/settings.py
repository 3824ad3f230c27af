"""One typed Settings model, read from defaults < gemma-launch.toml < environment variables < command-line
flags (launcher/settings_sources.py), checked against Google's rules (launcher/settings_rules.py).

Every check that can be made without calling an API is made here, so a bad value fails before any
request leaves the machine, with a message that names the value and a hint that says what to do.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from launcher.errors import UserError
from launcher.gpus import DEFAULT_MODEL, MODELS, default_model, serves
from launcher.settings_rules import (
    DEFAULT_SHAPES,
    GA_GPU_TIMEOUT_S,
    GPU_MINIMUMS,
    GPU_REGIONS,
    JOB_MEMORY_GIB,
    MAX_GPU_TIMEOUT_S,
    MAX_TIMEOUT_S,
    MIN_TIMEOUT_S,
    NO_GPU,
    PREVIEW_GPUS,
    REGION,
    RTX_CPUS,
    RTX_GIB_PER_CPU,
    check_bucket,
    cpu_count,
    memory_gib,
    parse_duration,
)

CONFIG_FILE = "gemma-launch.toml"

# What `gemma-launch init` writes for project_id, commented out; refused if used as it is.
PROJECT_PLACEHOLDER = "your-project-id"

_PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_ACCOUNT_ID = re.compile(r"^[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_REPOSITORY = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_JOB = re.compile(r"^[a-z]([-a-z0-9]{0,47}[a-z0-9])?$")
_IMAGE = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$")
_SECRET_ID = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class Settings(BaseModel):
    """Everything the tutorial's gcloud commands set, with the tutorial's defaults."""

    # A number where text is expected (memory = 80 in the file) is read as text, so the setting's own
    # check says what is wrong with it ("'80' is not a memory size like 80Gi").
    model_config = ConfigDict(extra="forbid", validate_default=True, coerce_numbers_to_str=True)

    # `examples`: the value a hint suggests when the default is empty or is the value refused.
    project_id: str = Field(
        description="Google Cloud project id, as `gcloud projects list` shows it (PROJECT_ID).",
        examples=["my-project-123"],
    )
    region: str = Field("europe-west4", description="Region of the bucket, repository and job (REGION).")
    build_location: str = Field(
        "global",
        description="Where Cloud Build runs the image build: global (as `gcloud builds submit` without "
        "--region) or a region; some projects may only build in a few. The image still goes to REGION.",
    )
    service_account: str = Field(
        "gemma3-finetuning", description="Service account id the job runs as (SERVICE_ACCOUNT)."
    )
    build_service_account: str = Field(
        "gemma3-finetuning-build",
        description="Service account id Cloud Build runs as; `up` grants it only what a build needs "
        "(BUILD_SERVICE_ACCOUNT).",
    )
    bucket: str = Field(
        "", description="Bucket for weights, data and results (BUCKET_NAME).", examples=["my-gemma-bucket"]
    )
    repository: str = Field(
        "gemma3-finetuning-repo", description="Artifact Registry Docker repository (AR_REPO)."
    )
    secret_id: str = Field("HF_TOKEN", description="Secret Manager secret holding the HF token (SECRET_ID).")
    image: str = Field("gemma3-finetune", description="Image name in the repository (IMAGE_NAME).")
    job: str = Field("gemma3-finetuning-job", description="Cloud Run job name (JOB_NAME).")
    gpu: Literal["nvidia-rtx-pro-6000", "nvidia-l4", "none"] = Field(
        "nvidia-rtx-pro-6000",
        description="GPU type: nvidia-rtx-pro-6000 (96 GB), nvidia-l4 (24 GB"
        # Said where the L4 is offered, so that nobody picks it to find `up` refuse it (launcher/gpus.py).
        + ("" if serves("nvidia-l4") else "; refused today: its driver cannot run the image's torch")
        + "), or none: the same job on CPU only, which needs no GPU quota (a rehearsal of the whole flow "
        "for cents).",
    )
    gpu_zonal_redundancy: bool = Field(
        False, description="Reserve zonal-redundant GPU capacity (needs that quota; off in the tutorial)."
    )
    cpu: str = Field(
        "",
        description="CPUs per task: 20 or 22 with an RTX PRO 6000 (default 20); 1, 2, 4, 6 or 8 otherwise "
        "(default 8; at least 4 with an L4).",
        examples=["20"],
    )
    memory: str = Field(
        "",
        description="Memory per task: 80Gi to 4Gi per CPU with an RTX PRO 6000 (default 80Gi); otherwise "
        "within Cloud Run's range for the CPU count, up to 32Gi (default 32Gi; at least 16Gi with an L4).",
        examples=["80Gi"],
    )
    task_timeout: str = Field(
        "1h",
        description="Time limit of one task attempt, e.g. 1h or 90m. With a GPU at most 12h, and over 1h the "
        "job opts into Cloud Run's Preview of long running GPU jobs; without one at most 168h.",
    )
    max_retries: int = Field(3, ge=0, le=10, description="Retries of a failed or preempted task (0-10).")
    network: str = Field(
        "", description="VPC network for Direct VPC egress (empty: none).", examples=["default"]
    )
    subnet: str = Field("", description="Subnet for Direct VPC egress.", examples=["default"])
    vpc_egress: Literal["all-traffic", "private-ranges-only"] = Field(
        "private-ranges-only", description="Which traffic goes through the VPC when a network is set."
    )
    model_id: str = Field(
        "",
        description=f"Hugging Face model to fine-tune (default {MODELS[DEFAULT_MODEL].hub_id}; with "
        f"--gpu nvidia-l4 {default_model('nvidia-l4')}, the largest whose training fits an L4).",
    )
    dataset_id: str = Field("timm/oxford-iiit-pet", description="Hugging Face dataset of the pets.")
    trainer: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Trainer flags passed to the job, e.g. train-size = 1000."
    )
    hf_token: SecretStr | None = Field(None, exclude=True, repr=False)
    # True when model_id was not given and the GPU's default stands in for it.
    _model_defaulted: bool = PrivateAttr(False)

    @field_validator("project_id")
    @classmethod
    def _project_id(cls, value: str) -> str:
        if value == PROJECT_PLACEHOLDER:
            raise ValueError(f"{value!r} is the placeholder `gemma-launch init` wrote, not a project")
        if not _PROJECT_ID.match(value):
            raise ValueError(
                f"project id {value!r} is invalid: 6-30 characters, lower-case letters, digits and hyphens, "
                "starting with a letter"
            )
        return value

    @field_validator("build_location")
    @classmethod
    def _build_location(cls, value: str) -> str:
        if value != "global" and not REGION.match(value):
            raise ValueError(f"build location {value!r} is invalid: global or a region such as us-central1")
        return value

    @field_validator("service_account", "build_service_account")
    @classmethod
    def _service_account(cls, value: str) -> str:
        if not _ACCOUNT_ID.match(value):
            raise ValueError(
                f"service account id {value!r} is invalid: 6-30 lower-case letters, digits and hyphens, "
                "starting with a letter"
            )
        return value

    @field_validator("repository")
    @classmethod
    def _repository(cls, value: str) -> str:
        if not _REPOSITORY.match(value):
            raise ValueError(f"repository {value!r} is invalid: lower-case letters, digits and hyphens")
        return value

    @field_validator("job")
    @classmethod
    def _job(cls, value: str) -> str:
        if not _JOB.match(value):
            raise ValueError(
                f"job name {value!r} is invalid: up to 49 lower-case letters, digits and hyphens, "
                "starting with a letter"
            )
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not _IMAGE.match(value):
            raise ValueError(f"image name {value!r} is invalid: lower-case letters, digits, '.', '_', '-'")
        return value

    @field_validator("secret_id")
    @classmethod
    def _secret_id(cls, value: str) -> str:
        if not _SECRET_ID.match(value):
            raise ValueError(f"secret id {value!r} is invalid: letters, digits, '_' and '-' only")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str) -> str:
        if value:
            memory_gib(value)
        return value

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, value: str) -> str:
        if value:
            cpu_count(value)
        return value

    @field_validator("task_timeout")
    @classmethod
    def _task_timeout(cls, value: str) -> str:
        seconds = parse_duration(value)
        if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
            raise ValueError(f"task timeout {value!r} must be between 10s and 168h")
        return value

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if not self.bucket:
            self.bucket = f"{self.project_id}-gemma3-finetuning"
        cpu, memory = DEFAULT_SHAPES[self.gpu]
        self.cpu = self.cpu or cpu
        self.memory = self.memory or memory
        if not self.model_id:
            self.model_id, self._model_defaulted = default_model(self.gpu), True
        return self

    def check_consistency(self, *, gpu_region: bool = True) -> None:
        """Checks that involve several settings, each with a hint naming the flags to change.

        `gpu_region=False` leaves out whether the GPU is offered in the region: `doctor` reports that as
        one of its checks instead of stopping before the others."""
        check_bucket(self.bucket)
        if gpu_region and (problem := self.gpu_not_offered()):
            raise problem
        if self.uses_gpu:
            min_cpu, min_gib = GPU_MINIMUMS[self.gpu]
            if cpu_count(self.cpu) < min_cpu:
                raise UserError(
                    f"Cloud Run needs at least {min_cpu:g} CPUs per task with {self.gpu}; cpu is {self.cpu}.",
                    f"Use --cpu {min_cpu:g} (or more), or set cpu in gemma-launch.toml.",
                )
            if memory_gib(self.memory) < min_gib:
                raise UserError(
                    f"Cloud Run needs at least {min_gib:g}Gi of memory per task with {self.gpu}; memory is "
                    f"{self.memory}.",
                    f"Use --memory {min_gib:g}Gi (or more), or set memory in gemma-launch.toml.",
                )
        self._check_shape()
        check_task_timeout(self, self.task_timeout_s, "--task-timeout")
        if self.subnet and not self.network:
            raise UserError(
                "A subnet is set without a network.", "Direct VPC egress needs both: add --network NETWORK."
            )

    def _check_shape(self) -> None:
        """CPU and memory as Cloud Run accepts them for a job, before any request (see JOB_MEMORY_GIB)."""
        cpu, gib = cpu_count(self.cpu), memory_gib(self.memory)
        if self.gpu == "nvidia-rtx-pro-6000":
            if cpu not in RTX_CPUS:
                raise UserError(
                    f"Cloud Run runs an RTX PRO 6000 task with 20 or 22 CPUs; cpu is {self.cpu}.",
                    "Use --cpu 20 or --cpu 22, or set cpu in gemma-launch.toml.",
                )
            high = cpu * RTX_GIB_PER_CPU
            if gib > high:
                raise UserError(
                    f"Cloud Run allows at most {high:g}Gi of memory with {cpu:g} CPUs and an RTX PRO 6000; "
                    f"memory is {self.memory}.",
                    f"Use --memory {high:g}Gi or less (or --cpu 22 for up to 88Gi).",
                )
            return
        if cpu not in JOB_MEMORY_GIB:
            raise UserError(
                f"Cloud Run runs a job task with 1, 2, 4, 6 or 8 CPUs{self._with_gpu}; cpu is {self.cpu}.",
                "Use --cpu with one of 1, 2, 4, 6, 8, or set cpu in gemma-launch.toml.",
            )
        low, high = JOB_MEMORY_GIB[cpu]
        if not low <= gib <= high:
            raise UserError(
                f"With {cpu:g} CPUs, Cloud Run takes {low:g}Gi to {high:g}Gi of memory per task; memory is "
                f"{self.memory}.",
                f"Use --memory between {low:g}Gi and {high:g}Gi, or another --cpu: 1 CPU takes up to 4Gi, "
                "2 up to 8Gi, 4 up to 16Gi, 6 up to 24Gi, 8 up to 32Gi.",
            )

    def gpu_not_offered(self) -> UserError | None:
        """Why Cloud Run cannot give the job its GPU in the region (GPU_REGIONS), or why the region is no
        region at all, else None."""
        well_formed = bool(REGION.match(self.region))
        if well_formed and (not self.uses_gpu or self.region in GPU_REGIONS[self.gpu]):
            return None
        # A CPU-only job runs in any region; those of the default GPU are as good an example as any.
        gpu = self.gpu if self.uses_gpu else Settings.model_fields["gpu"].default
        regions = ", ".join(GPU_REGIONS[gpu])
        how = "(or set REGION, or region in gemma-launch.toml)"
        if not well_formed:
            offered = f" Cloud Run Jobs offers {gpu} GPUs in {regions}." if self.uses_gpu else ""
            return UserError(
                f"{self.region!r} is not a Google Cloud region: regions are named like us-central1.{offered}",
                f"Use --region with one of {regions} {how}.",
            )
        return UserError(
            f"{self.gpu} GPUs are not offered in {self.region}: Cloud Run Jobs offers them in {regions}.",
            f"Use --region with one of {regions} {how}, or another --gpu.",
        )

    @property
    def _with_gpu(self) -> str:
        return f" and an {self.gpu} GPU" if self.uses_gpu else ""

    @staticmethod
    def shape_default(name: str) -> str:
        cpu, memory = DEFAULT_SHAPES[Settings.model_fields["gpu"].default]
        return cpu if name == "cpu" else memory

    @property
    def uses_gpu(self) -> bool:
        return self.gpu != NO_GPU

    @property
    def model_defaulted(self) -> bool:
        """Whether model_id is the GPU's default, given by no flag, file or environment variable."""
        return self._model_defaulted

    @property
    def task_timeout_s(self) -> int:
        return parse_duration(self.task_timeout)

    @property
    def service_account_email(self) -> str:
        return f"{self.service_account}@{self.project_id}.iam.gserviceaccount.com"

    @property
    def build_service_account_email(self) -> str:
        return f"{self.build_service_account}@{self.project_id}.iam.gserviceaccount.com"

    @property
    def location(self) -> str:
        return f"projects/{self.project_id}/locations/{self.region}"

    @property
    def build_parent(self) -> str:
        return f"projects/{self.project_id}/locations/{self.build_location}"

    @property
    def repository_name(self) -> str:
        return f"{self.location}/repositories/{self.repository}"

    @property
    def secret_name(self) -> str:
        return f"projects/{self.project_id}/secrets/{self.secret_id}"

    @property
    def job_name(self) -> str:
        return f"{self.location}/jobs/{self.job}"

    @property
    def image_repository_uri(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project_id}/{self.repository}/{self.image}"

    @property
    def launch_stage(self) -> str:
        """BETA when the job uses a preview feature (a preview GPU, a GPU task over 1 h), else GA."""
        return "BETA" if needs_preview(self, self.task_timeout_s) else "GA"

    def require_hf_token(self) -> SecretStr:
        if self.hf_token is None or not self.hf_token.get_secret_value().strip():
            raise UserError(
                "No Hugging Face token found.",
                "export HF_TOKEN=hf_... (a read token of an account that accepted the Gemma licence), "
                "or log in once with `hf auth login`.",
            )
        return self.hf_token


def needs_preview(settings: Settings, timeout_s: int) -> bool:
    return settings.gpu in PREVIEW_GPUS or (settings.uses_gpu and timeout_s > GA_GPU_TIMEOUT_S)


def check_task_timeout(settings: Settings, timeout_s: int, flag: str) -> None:
    """A GPU task runs at most 12 h on Cloud Run (task-timeout page); `flag` names what set the timeout."""
    if settings.uses_gpu and timeout_s > MAX_GPU_TIMEOUT_S:
        raise UserError(
            f"Cloud Run stops a GPU task after at most 12h; {flag} asks for {timeout_s / 3600:g}h.",
            f"Use {flag} 12h or less: a retried task resumes from the checkpoints of its execution.",
        )


def check_run_timeout(settings: Settings, timeout_s: int) -> None:
    """`run --timeout`: the job's launch stage was set by `up` from task_timeout, and caps the override."""
    check_task_timeout(settings, timeout_s, "--timeout")
    if needs_preview(settings, timeout_s) and not needs_preview(settings, settings.task_timeout_s):
        raise UserError(
            f"A GPU task over 1h needs Cloud Run's Preview of long running GPU jobs, and the job is GA "
            f"(task_timeout {settings.task_timeout}); --timeout asks for {timeout_s / 3600:g}h.",
            "Use --timeout 1h or less, or run `gemma-launch up --task-timeout "
            f"{timeout_s // 3600}h` first: the job then opts into the Preview.",
        )
