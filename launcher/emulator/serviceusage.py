"""Service Usage v1: which APIs a project has enabled (https://cloud.google.com/service-usage/docs/reference/rpc).

A project starts with Google's default services (access.DEFAULT_ENABLED); every other emulated API
answers SERVICE_DISABLED until it is enabled here, and for a moment after (access.py: the API's own
servers learn of it later than Service Usage). Enabling is a long-running operation, as in Google.
"""

from __future__ import annotations

import re

import grpc
from google.cloud import service_usage_v1
from google.longrunning import operations_pb2

from launcher.emulator.access import TITLES, Access, error_info
from launcher.emulator.operations import Operations
from launcher.emulator.rpc import ApiError, Hub, Method, invalid, service_handler

_PARENT = re.compile(r"^projects/(?P<project>[^/]+)$")
_SERVICE = re.compile(r"^projects/(?P<project>[^/]+)/services/(?P<service>[^/]+)$")
# BatchEnableServices takes at most 20 services a call (its reference page).
_BATCH_LIMIT = 20
# BatchGetServices reads at most 30 (serviceusage.proto, BatchGetServicesRequest.names).
_BATCH_GET_LIMIT = 30
# APIs that bill: Service Usage refuses to enable them in a project without billing, FAILED_PRECONDITION
# "Billing must be enabled for activation of service(s) ..." with reason UREQ_PROJECT_BILLING_NOT_FOUND
# (https://cloud.google.com/service-usage/docs/troubleshooting; each API's pricing page says it bills).
_BILLABLE = frozenset(
    {
        "run.googleapis.com",
        "cloudbuild.googleapis.com",
        "artifactregistry.googleapis.com",
        "secretmanager.googleapis.com",
    }
)


class ServiceUsage:
    def __init__(self, access: Access, operations: Operations) -> None:
        self.access = access
        self.operations = operations

    def _service(self, project: str, service: str) -> service_usage_v1.Service:
        record = self.access.project(project)
        state = (
            service_usage_v1.State.ENABLED
            if service in record["services"]
            else service_usage_v1.State.DISABLED
        )
        return service_usage_v1.Service(
            name=f"projects/{record['number']}/services/{service}",
            parent=f"projects/{record['number']}",
            config=service_usage_v1.ServiceConfig(name=service, title=TITLES.get(service, service)),
            state=state,
        )

    def _enable(self, project: str, services: list[str]) -> list[service_usage_v1.Service]:
        unknown = [service for service in services if not service.endswith(".googleapis.com")]
        if unknown:
            raise invalid(f"Service {unknown[0]} is not a valid service name, e.g. run.googleapis.com.")

        record = self.access.project(project)
        billed = sorted(set(services) & _BILLABLE - set(record["services"]))
        if billed and not record["billing_enabled"]:
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Billing must be enabled for activation of service(s) '{','.join(billed)}' to proceed.",
                details=[
                    error_info(
                        "UREQ_PROJECT_BILLING_NOT_FOUND",
                        "serviceusage.googleapis.com",
                        project=record["number"],
                        services=",".join(billed),
                    )
                ],
            )

        self.access.apis_enabled(project, services)
        return [self._service(project, service) for service in services]

    def enable(self, request: service_usage_v1.EnableServiceRequest, context: grpc.ServicerContext):
        match = _SERVICE.match(request.name)
        if not match:
            raise invalid(f"Invalid service name {request.name!r}: projects/PROJECT/services/SERVICE.")
        (service,) = self._enable(match["project"], [match["service"]])
        return self.operations.start(
            f"projects/{match['project']}", service_usage_v1.EnableServiceResponse(service=service)
        )

    def batch_enable(
        self, request: service_usage_v1.BatchEnableServicesRequest, context: grpc.ServicerContext
    ):
        match = _PARENT.match(request.parent)
        if not match:
            raise invalid(f"Invalid parent {request.parent!r}: projects/PROJECT.")
        if not 0 < len(request.service_ids) <= _BATCH_LIMIT:
            raise invalid(
                f"service_ids must name 1 to {_BATCH_LIMIT} services, got {len(request.service_ids)}."
            )
        services = self._enable(match["project"], list(request.service_ids))
        return self.operations.start(
            request.parent, service_usage_v1.BatchEnableServicesResponse(services=services)
        )

    def disable(self, request: service_usage_v1.DisableServiceRequest, context: grpc.ServicerContext):
        match = _SERVICE.match(request.name)
        if not match:
            raise invalid(f"Invalid service name {request.name!r}: projects/PROJECT/services/SERVICE.")

        def remove(record: dict) -> None:
            record["services"] = [service for service in record["services"] if service != match["service"]]

        self.access.update_project(match["project"], remove)
        service = self._service(match["project"], match["service"])
        return self.operations.start(
            f"projects/{match['project']}", service_usage_v1.DisableServiceResponse(service=service)
        )

    def get(self, request: service_usage_v1.GetServiceRequest, context: grpc.ServicerContext):
        match = _SERVICE.match(request.name)
        if not match:
            raise invalid(f"Invalid service name {request.name!r}: projects/PROJECT/services/SERVICE.")
        return self._service(match["project"], match["service"])

    def batch_get(self, request: service_usage_v1.BatchGetServicesRequest, context: grpc.ServicerContext):
        """serviceusage.proto, BatchGetServicesRequest: at most 30 names, each under `parent` if set."""
        if len(request.names) > _BATCH_GET_LIMIT:
            raise invalid(
                f"names: a single request can get at most {_BATCH_GET_LIMIT} services, "
                f"got {len(request.names)}."
            )
        if request.parent:
            parent = _PARENT.match(request.parent)
            if not parent:
                raise invalid(f"Invalid parent {request.parent!r}: projects/PROJECT.")
            for name in request.names:
                service = _SERVICE.match(name)
                project = self.access.project_id(service["project"]) if service else None
                if project != self.access.project_id(parent["project"]):
                    raise invalid(f"Service {name!r} is not under the parent {request.parent!r}.")
        services = [
            self.get(service_usage_v1.GetServiceRequest(name=name), context) for name in request.names
        ]
        return service_usage_v1.BatchGetServicesResponse(services=services)

    def list(self, request: service_usage_v1.ListServicesRequest, context: grpc.ServicerContext):
        match = _PARENT.match(request.parent)
        if not match:
            raise invalid(f"Invalid parent {request.parent!r}: projects/PROJECT.")
        if request.filter not in ("", "state:ENABLED", "state:DISABLED"):
            raise invalid(f"Unsupported filter {request.filter!r}: use state:ENABLED or state:DISABLED.")
        record = self.access.project(match["project"])
        names = sorted(record["services"]) if request.filter != "state:DISABLED" else []
        if request.filter == "state:DISABLED":
            names = sorted(set(TITLES) - set(record["services"]))
        elif not request.filter:
            names = sorted(set(TITLES) | set(record["services"]))
        return service_usage_v1.ListServicesResponse(
            services=[self._service(match["project"], name) for name in names]
        )

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.api.serviceusage.v1.ServiceUsage",
            [
                Method(
                    "EnableService",
                    self.enable,
                    service_usage_v1.EnableServiceRequest,
                    operations_pb2.Operation,
                ),
                Method(
                    "BatchEnableServices",
                    self.batch_enable,
                    service_usage_v1.BatchEnableServicesRequest,
                    operations_pb2.Operation,
                ),
                Method(
                    "DisableService",
                    self.disable,
                    service_usage_v1.DisableServiceRequest,
                    operations_pb2.Operation,
                ),
                Method("GetService", self.get, service_usage_v1.GetServiceRequest, service_usage_v1.Service),
                Method(
                    "BatchGetServices",
                    self.batch_get,
                    service_usage_v1.BatchGetServicesRequest,
                    service_usage_v1.BatchGetServicesResponse,
                ),
                Method(
                    "ListServices",
                    self.list,
                    service_usage_v1.ListServicesRequest,
                    service_usage_v1.ListServicesResponse,
                ),
            ],
            hub,
        )
