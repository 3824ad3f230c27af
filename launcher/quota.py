"""The job's Cloud Run GPU quota, read through the Cloud Quotas API, so `run` can refuse before RunJob.

Cloud Run GPU quota starts at zero, with or without zonal redundancy, and is requested per region
(https://cloud.google.com/run/docs/configuring/jobs/gpu, "Request quota"); an execution that needs more
GPUs than the quota leaves fails ("Quota exceeded for total allowable count of GPUs per project per
region."). The quota ids are Cloud Run's (service run.googleapis.com); the RTX PRO 6000 quota counts
milli-GPUs, the L4 quota whole GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.api_core import exceptions
from google.cloud import cloudquotas_v1

from launcher.cloud import RETRY, Clients
from launcher.errors import UserError
from launcher.settings import Settings

SERVICE = "run.googleapis.com"
# (gpu, zonal redundancy) -> quota id
QUOTA_IDS = {
    ("nvidia-l4", False): "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion",
    ("nvidia-l4", True): "NvidiaL4GpuAllocPerProjectRegion",
    ("nvidia-rtx-pro-6000", False): "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion",
    ("nvidia-rtx-pro-6000", True): "NvidiaRtxPro6000GpuAllocPerProjectRegion",
}
UNITS_PER_GPU = {"nvidia-l4": 1, "nvidia-rtx-pro-6000": 1000}
# QuotaInfo.service_request_quota_uri's example, used when the answer leaves it out.
CONSOLE_QUOTAS = "https://console.cloud.google.com/iam-admin/quotas"


@dataclass(frozen=True)
class GpuQuota:
    quota_id: str
    region: str
    gpus: float  # how many of the job's GPUs the project may use at once in the region
    request_url: str

    def describe(self) -> str:
        return f"{self.quota_id} in {self.region}: {self.gpus:g} GPU{'' if self.gpus == 1 else 's'}"


class QuotaUnknown(Exception):
    """The quota could not be read (e.g. the Cloud Quotas API is not enabled or not permitted)."""


def read(clients: Clients, settings: Settings) -> GpuQuota | None:
    """The job's GPU quota in its region; None for a job without a GPU. Raises QuotaUnknown."""
    if not settings.uses_gpu:
        return None
    quota_id = QUOTA_IDS[settings.gpu, settings.gpu_zonal_redundancy]
    name = f"projects/{settings.project_id}/locations/global/services/{SERVICE}/quotaInfos/{quota_id}"
    try:
        info = clients.quotas.get_quota_info(name=name, retry=RETRY)
    except (exceptions.PermissionDenied, exceptions.NotFound, exceptions.Forbidden) as error:
        raise QuotaUnknown(f"{quota_id} could not be read: {error.message}") from None
    units = _value(info, settings.region)
    url = f"{info.service_request_quota_uri or CONSOLE_QUOTAS}?project={settings.project_id}"
    return GpuQuota(quota_id, settings.region, units / UNITS_PER_GPU[settings.gpu], url)


def _value(info: cloudquotas_v1.QuotaInfo, region: str) -> int:
    """The value for `region`: its own entry, else the one without a region dimension, which applies to
    every region without an entry of its own (DimensionsInfo.dimensions proto comment)."""
    fallback = 0
    for dimensions in info.dimensions_infos:
        if dimensions.dimensions.get("region") == region:
            return dimensions.details.value
        if "region" not in dimensions.dimensions:
            fallback = dimensions.details.value
    return fallback


def require_for_run(clients: Clients, settings: Settings, held: int) -> GpuQuota | None:
    """Refuse a run whose GPU the quota cannot give; `held`: GPUs the job's unfinished executions hold.

    None when there is nothing to check (no GPU); QuotaUnknown when the quota could not be read.
    """
    quota = read(clients, settings)
    if quota is None or quota.gpus >= held + 1:
        return quota
    if quota.gpus < 1:
        raise UserError(
            f"The project has no Cloud Run GPU quota for {settings.gpu} in {settings.region} "
            f"({quota.describe()}): Cloud Run would fail the execution.",
            f"Request {quota.quota_id} for region {settings.region} at {quota.request_url} (GPU quota is "
            "granted per region); meanwhile `--gpu none` runs the same job on CPU only.",
        )
    raise UserError(
        f"The job's running executions already hold {held} of the {quota.gpus:g} {settings.gpu} GPU(s) of "
        f"{quota.quota_id} in {settings.region}: Cloud Run would fail another execution.",
        "Wait for them to finish (`gemma-launch status`), or request more quota at " + quota.request_url,
    )
