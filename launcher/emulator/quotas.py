"""Cloud Quotas API v1, read side: the Cloud Run GPU quotas of a project (GetQuotaInfo, ListQuotaInfos).

Cloud Run GPU quota "starts at zero" with or without zonal redundancy and is requested per region
(https://cloud.google.com/run/docs/configuring/jobs/gpu, .../services/gpu-zonal-redundancy, "Request
quota"), so a fresh emulator serves 0 everywhere; `Emulator(gpu_quota=N)` is a project whose request for
N GPUs was granted in every region. RunService asks `gpu_limit` before it lets an execution take GPUs.

Ids and names are Cloud Run's own, as `gcloud beta quotas info list --service=run.googleapis.com` lists
them: quota ids `NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion` / `NvidiaL4GpuAllocPerProjectRegion`
(metrics run.googleapis.com/nvidia_l4_gpu_allocation[_no_zonal_redundancy]) and the RTX PRO 6000 pair.
The RTX PRO 6000 quota counts milli-GPUs (1000 per GPU), L4 quota whole GPUs.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import grpc
from google.cloud import cloudquotas_v1

from launcher.emulator.rpc import Hub, Method, invalid, not_found, service_handler

SERVICE = "run.googleapis.com"
# Where more quota is requested: the example of QuotaInfo.service_request_quota_uri's proto comment.
REQUEST_URI = "https://console.cloud.google.com/iam-admin/quotas"
_NAME = re.compile(
    r"^projects/(?P<project>[^/]+)/locations/global/services/(?P<service>[^/]+)/quotaInfos/(?P<quota>[^/]+)$"
)
_PARENT = re.compile(r"^projects/(?P<project>[^/]+)/locations/global/services/(?P<service>[^/]+)$")


@dataclass(frozen=True)
class GpuQuota:
    accelerator: str
    zonal_redundancy: bool
    quota_id: str
    metric: str
    display: str
    units_per_gpu: int


def _pair(accelerator: str, stem: str, metric: str, name: str, units: int) -> list[GpuQuota]:
    return [
        GpuQuota(
            accelerator,
            False,
            f"{stem}GpuAllocNoZonalRedundancyPerProjectRegion",
            f"{SERVICE}/{metric}_gpu_allocation_no_zonal_redundancy",
            f"Total {name} GPU allocation without zonal redundancy, per project per region",
            units,
        ),
        GpuQuota(
            accelerator,
            True,
            f"{stem}GpuAllocPerProjectRegion",
            f"{SERVICE}/{metric}_gpu_allocation",
            f"Total {name} GPU allocation with zonal redundancy, per project per region",
            units,
        ),
    ]


GPU_QUOTAS = _pair("nvidia-l4", "NvidiaL4", "nvidia_l4", "Nvidia L4", 1) + _pair(
    "nvidia-rtx-pro-6000", "NvidiaRtxPro6000", "nvidia_rtx_pro_6000", "NVIDIA RTX PRO 6000", 1000
)


def gpu_quota(accelerator: str, zonal_redundancy: bool) -> GpuQuota:
    return next(
        q for q in GPU_QUOTAS if (q.accelerator, q.zonal_redundancy) == (accelerator, zonal_redundancy)
    )


class Quotas:
    def __init__(self, gpus: int = 0) -> None:
        self._lock = threading.Lock()
        self._gpus = gpus

    def set_gpu_quota(self, gpus: int) -> None:
        """Every project, region, GPU type and redundancy setting gets `gpus` GPUs."""
        with self._lock:
            self._gpus = gpus

    def gpu_limit(self, project: str, region: str, accelerator: str, zonal_redundancy: bool) -> int:
        """How many GPUs of that kind the project's running tasks in `region` may hold together."""
        with self._lock:
            return self._gpus

    def _info(self, project: str, quota: GpuQuota) -> cloudquotas_v1.QuotaInfo:
        with self._lock:
            value = self._gpus * quota.units_per_gpu
        return cloudquotas_v1.QuotaInfo(
            name=f"projects/{project}/locations/global/services/{SERVICE}/quotaInfos/{quota.quota_id}",
            quota_id=quota.quota_id,
            metric=quota.metric,
            service=SERVICE,
            is_precise=True,
            container_type=cloudquotas_v1.QuotaInfo.ContainerType.PROJECT,
            dimensions=["region"],
            metric_display_name=quota.display.rsplit(",", 1)[0],
            quota_display_name=quota.display,
            quota_increase_eligibility=cloudquotas_v1.QuotaIncreaseEligibility(is_eligible=True),
            is_concurrent=True,
            # No "region" key: this value applies to every region (DimensionsInfo.dimensions proto comment).
            dimensions_infos=[
                cloudquotas_v1.DimensionsInfo(dimensions={}, details=cloudquotas_v1.QuotaDetails(value=value))
            ],
            service_request_quota_uri=REQUEST_URI,
        )

    def get_quota_info(self, request: cloudquotas_v1.GetQuotaInfoRequest, context: grpc.ServicerContext):
        match = _NAME.match(request.name)
        if not match:
            raise invalid(f"Invalid quota info name {request.name!r}.")
        quota = next((q for q in GPU_QUOTAS if q.quota_id == match["quota"]), None)
        if match["service"] != SERVICE or quota is None:
            raise not_found(f"QuotaInfo {request.name}")
        return self._info(match["project"], quota)

    def list_quota_infos(self, request: cloudquotas_v1.ListQuotaInfosRequest, context: grpc.ServicerContext):
        match = _PARENT.match(request.parent)
        if not match:
            raise invalid(f"Invalid parent {request.parent!r}.")
        infos = [self._info(match["project"], q) for q in GPU_QUOTAS] if match["service"] == SERVICE else []
        return cloudquotas_v1.ListQuotaInfosResponse(quota_infos=infos)

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        methods = [
            Method(
                "GetQuotaInfo",
                self.get_quota_info,
                cloudquotas_v1.GetQuotaInfoRequest,
                cloudquotas_v1.QuotaInfo,
            ),
            Method(
                "ListQuotaInfos",
                self.list_quota_infos,
                cloudquotas_v1.ListQuotaInfosRequest,
                cloudquotas_v1.ListQuotaInfosResponse,
            ),
        ]
        return service_handler("google.api.cloudquotas.v1.CloudQuotas", methods, hub)
