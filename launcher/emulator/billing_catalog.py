"""Cloud Billing Catalog v1 (google.cloud.billing.v1.CloudCatalog): the public list of services and their
SKUs, which any authenticated caller may read; no project is named, so no project's APIs or IAM apply
(https://cloud.google.com/billing/docs/how-to/get-pricing-information-api).

It serves Cloud Run's job prices as the fixture below holds them: Cloud Run's service id is Google's
(152E-C115-5142, as https://cloud.google.com/skus/sku-groups/cloud-run-cud-eligible-skus lists it), the
SKU descriptions follow that page's ("Jobs CPU in <region>"), and each SKU has a free tier of 0 then its
price, as the catalog's tiered rates do. PRICES_DATE: when the prices were read from
https://cloud.google.com/run/pricing (Tier 1; GPUs without zonal redundancy, as jobs are billed). The L4's
is the page's $0.672 per hour; the RTX PRO 6000's is not confirmed from the page (an assumption, the same
as launcher/pricing.py's built-in table).
"""

from __future__ import annotations

import grpc
from google.cloud import billing_v1
from google.type import money_pb2

from launcher.emulator.rpc import Hub, Method, invalid, not_found, service_handler

PRICES_DATE = "2026-12-04"
SERVICE = billing_v1.Service(
    name="services/152E-C115-5142",
    service_id="152E-C115-5142",
    display_name="Cloud Run",
    business_entity_name="businessEntities/GCP",
)
TIER_1 = ("europe-west1", "europe-west4", "us-central1", "us-east4", "asia-southeast1")
# (description before " in <region>", usage unit, USD per unit)
RATES = (
    ("Jobs CPU", "s", 0.000018),
    ("Jobs Memory", "GiBy.s", 0.000002),
    ("Jobs Nvidia L4 GPU without zonal redundancy", "s", 0.0001867),
    ("Jobs Nvidia RTX PRO 6000 GPU without zonal redundancy", "s", 0.0005),
)


def _money(usd: float) -> money_pb2.Money:
    nanos = round(usd * 1e9)
    return money_pb2.Money(currency_code="USD", units=nanos // 10**9, nanos=nanos % 10**9)


def _skus() -> list[billing_v1.Sku]:
    skus = []
    for index, (what, unit, usd) in enumerate(RATES):
        for number, region in enumerate(TIER_1):
            sku_id = f"E{index:03d}-{number:04d}-CR00"
            skus.append(
                billing_v1.Sku(
                    name=f"{SERVICE.name}/skus/{sku_id}",
                    sku_id=sku_id,
                    description=f"{what} in {region}",
                    category=billing_v1.Category(
                        service_display_name="Cloud Run", resource_family="Compute", usage_type="OnDemand"
                    ),
                    service_regions=[region],
                    service_provider_name="Google",
                    pricing_info=[
                        billing_v1.PricingInfo(
                            summary=f"{what} (prices of {PRICES_DATE})",
                            pricing_expression=billing_v1.PricingExpression(
                                usage_unit=unit,
                                tiered_rates=[
                                    billing_v1.PricingExpression.TierRate(
                                        start_usage_amount=0, unit_price=_money(0)
                                    ),
                                    billing_v1.PricingExpression.TierRate(
                                        start_usage_amount=0, unit_price=_money(usd)
                                    ),
                                ],
                            ),
                            currency_conversion_rate=1.0,
                        )
                    ],
                )
            )
    return skus


def _page(items: list, size: int, token: str) -> tuple[list, str]:
    if token and not token.isdigit():
        raise invalid(f"Invalid page token {token!r}.")
    start = int(token or 0)
    end = len(items) if size <= 0 else start + min(size, 5000)
    return items[start:end], str(end) if end < len(items) else ""


class Catalog:
    def __init__(self) -> None:
        self.skus = _skus()

    def list_services(self, request: billing_v1.ListServicesRequest, context: grpc.ServicerContext):
        page, token = _page([SERVICE], request.page_size, request.page_token)
        return billing_v1.ListServicesResponse(services=page, next_page_token=token)

    def list_skus(self, request: billing_v1.ListSkusRequest, context: grpc.ServicerContext):
        if request.parent != SERVICE.name:
            raise not_found(f"Service {request.parent}")
        page, token = _page(self.skus, request.page_size, request.page_token)
        return billing_v1.ListSkusResponse(skus=page, next_page_token=token)

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.cloud.billing.v1.CloudCatalog",
            [
                Method(
                    "ListServices",
                    self.list_services,
                    billing_v1.ListServicesRequest,
                    billing_v1.ListServicesResponse,
                ),
                Method("ListSkus", self.list_skus, billing_v1.ListSkusRequest, billing_v1.ListSkusResponse),
            ],
            hub,
        )
