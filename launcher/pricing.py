"""Cloud Run job prices per second: from the Cloud Billing Catalog API, else a built-in dated table.

A GPU job is billed for the whole life of its instance, CPU, memory and GPU, and always at the GPU
price without zonal redundancy ("GPU for jobs follow No zonal redundancy pricing", "GPU is billed for the
entire duration of the instance lifecycle": https://cloud.google.com/run/docs/configuring/jobs/gpu).
Prices are USD, Tier 1 regions, on-demand, past the free tier (which does not cover GPUs).

The catalog lists each price as a SKU of the service "Cloud Run" whose description names the resource and
the region: "Jobs CPU in europe-west4" (the SKU names https://cloud.google.com/skus/sku-groups/
cloud-run-cud-eligible-skus lists), "Jobs Memory in ...", and for a GPU its name and "without zonal
redundancy". A SKU's last tiered rate is the price past the free tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.api_core import exceptions
from google.cloud import billing_v1

from launcher.cloud import TRANSIENT, Clients

# Read from https://cloud.google.com/run/pricing ("Jobs" and "GPU" tables, Tier 1, instance-based
# billing) on this date. The L4's price is the page's $0.672 per hour without zonal redundancy. The RTX
# PRO 6000's is NOT confirmed from the page (not reachable from here): an assumption to check there.
BUILT_IN_DATE = "2026-12-04"
BUILT_IN_CPU_S = 0.000018  # per vCPU-second
BUILT_IN_MEMORY_GIB_S = 0.000002  # per GiB-second
BUILT_IN_GPU_S = {"nvidia-l4": 0.0001867, "nvidia-rtx-pro-6000": 0.0005}
# How the catalog names each GPU in its SKUs' descriptions.
GPU_SKU_NAMES = {"nvidia-l4": "L4", "nvidia-rtx-pro-6000": "RTX PRO 6000"}
SERVICE = "Cloud Run"


@dataclass(frozen=True)
class Prices:
    cpu_s: float  # USD per vCPU-second
    memory_gib_s: float  # USD per GiB-second
    gpu_s: float  # USD per GPU-second, without zonal redundancy (0 for a job without a GPU)
    source: str  # where they came from, as the output names it

    def per_second(self, cpu: float, memory_gib: float, gpus: int) -> float:
        return cpu * self.cpu_s + memory_gib * self.memory_gib_s + gpus * self.gpu_s


def built_in(gpu: str) -> Prices:
    return Prices(
        BUILT_IN_CPU_S,
        BUILT_IN_MEMORY_GIB_S,
        BUILT_IN_GPU_S.get(gpu, 0.0),
        f"built-in table of {BUILT_IN_DATE} (the Cloud Billing Catalog API was not reachable)",
    )


def _unit_price(sku: billing_v1.Sku) -> float:
    rates = sku.pricing_info[0].pricing_expression.tiered_rates
    price = rates[-1].unit_price
    return price.units + price.nanos / 1e9


def from_catalog(clients: Clients, region: str, gpu: str) -> Prices | None:
    """The region's prices from the catalog; None when a SKU this job needs is not listed there."""
    catalog = clients.catalog
    service = next((s for s in catalog.list_services() if s.display_name == SERVICE), None)
    if service is None:
        return None
    found: dict[str, float] = {}
    gpu_name = GPU_SKU_NAMES.get(gpu)
    for sku in catalog.list_skus(parent=service.name):
        text = sku.description
        if region not in sku.service_regions or not sku.pricing_info or not text.startswith("Jobs "):
            continue
        if text == f"Jobs CPU in {region}":
            found["cpu"] = _unit_price(sku)
        elif text == f"Jobs Memory in {region}":
            found["memory"] = _unit_price(sku)
        elif gpu_name and gpu_name in text and "without zonal redundancy" in text:
            found["gpu"] = _unit_price(sku)
    if "cpu" not in found or "memory" not in found or (gpu_name and "gpu" not in found):
        return None
    return Prices(found["cpu"], found["memory"], found.get("gpu", 0.0), "Cloud Billing Catalog API")


def prices(clients: Clients, region: str, gpu: str) -> Prices:
    """The catalog's prices, else the built-in table's: an estimate never stops a run."""
    try:
        return from_catalog(clients, region, gpu) or built_in(gpu)
    except (exceptions.GoogleAPICallError, exceptions.RetryError, *TRANSIENT):
        return built_in(gpu)
