"""IAM Admin v1: service accounts (create, get, list, delete, disable, enable).

Each account gets a new unique id, so one created again under a deleted one's email is another
identity; deleting one renames its grants in every policy (access.py says how and why).

Disabling keeps the account and its grants but cuts it off: "Existing access tokens for the service
account are rejected, and requests for new access tokens will fail"; enabling it again makes "its
existing access tokens ... accepted" (https://cloud.google.com/iam/docs/reference/rest/v1/
projects.serviceAccounts/disable). Each is a no-op on an account already in that state ("If the service
account is already enabled, then this method has no effect", .../projects.serviceAccounts/enable;
https://cloud.google.com/iam/docs/service-accounts-disable-enable says the same of disabling a disabled
one). Either on an account that does not exist is PERMISSION_DENIED, not NOT_FOUND
(https://cloud.google.com/sdk/gcloud/reference/iam/service-accounts/disable: "If the service account
does not exist, this command returns a PERMISSION_DENIED error."). access.py refuses a disabled
account's tokens; run_process.py and cloudbuild_builder.py fail what would run as it.
"""

from __future__ import annotations

import re
import secrets

import grpc
from google.cloud import iam_admin_v1
from google.protobuf import empty_pb2

from launcher.emulator.access import Access
from launcher.emulator.rpc import (
    ApiError,
    Hub,
    Method,
    already_exists,
    invalid,
    not_found,
    permission_denied,
    service_handler,
)
from launcher.emulator.state import State

_ACCOUNT_ID = re.compile(r"^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$")
_NAME = re.compile(r"^projects/(?P<project>[^/]+)/serviceAccounts/(?P<account>[^/]+)$")


def email_for(project: str, account_id: str) -> str:
    return f"{account_id}@{project}.iam.gserviceaccount.com"


class Iam:
    def __init__(self, state: State, access: Access) -> None:
        self.state = state
        self.access = access

    def _accounts(self) -> dict:
        return self.state.table("service_accounts")

    def create(self, request: iam_admin_v1.CreateServiceAccountRequest, context: grpc.ServicerContext):
        project = request.name.removeprefix("projects/")
        if not request.name.startswith("projects/") or "/" in project or not project:
            raise invalid(f"Invalid project resource name {request.name!r}.")
        if not _ACCOUNT_ID.match(request.account_id):
            raise invalid(
                f"Invalid account id {request.account_id!r}: 6-30 characters, lower-case letters, digits "
                "and hyphens, starting with a letter and not ending with a hyphen."
            )
        # iam.proto, ServiceAccount.display_name and .description.
        for field, limit in (("display_name", 100), ("description", 256)):
            size = len(getattr(request.service_account, field).encode())
            if size > limit:
                raise invalid(
                    f"service_account.{field} is {size} bytes; the maximum length is {limit} UTF-8 bytes."
                )
        email = email_for(project, request.account_id)
        account = iam_admin_v1.ServiceAccount(
            name=f"projects/{project}/serviceAccounts/{email}",
            project_id=project,
            email=email,
            # 21 digits, as Google's (iam.proto, ServiceAccount.unique_id is "the unique, stable numeric ID").
            unique_id=str(10**20 + secrets.randbelow(9 * 10**20)),
            display_name=request.service_account.display_name,
            description=request.service_account.description,
            etag=b"BwY=",
        )
        with self.state.transaction() as tables:
            if email in tables["service_accounts"]:
                raise already_exists(f"Service account {email}")
            tables["service_accounts"][email] = iam_admin_v1.ServiceAccount.to_dict(account)
        self.access.service_account_created(email)
        return account

    def _lookup(self, name: str) -> iam_admin_v1.ServiceAccount:
        match = _NAME.match(name)
        if not match:
            raise invalid(f"Invalid service account name {name!r}.")
        stored = self._accounts().get(match["account"])
        if stored is None:
            raise not_found(f"Service account {match['account']}")
        return iam_admin_v1.ServiceAccount(stored)

    def get(self, request: iam_admin_v1.GetServiceAccountRequest, context: grpc.ServicerContext):
        return self._lookup(request.name)

    def list(self, request: iam_admin_v1.ListServiceAccountsRequest, context: grpc.ServicerContext):
        project = request.name.removeprefix("projects/")
        accounts = [
            iam_admin_v1.ServiceAccount(stored)
            for stored in self._accounts().values()
            if stored["project_id"] == project
        ]
        return iam_admin_v1.ListServiceAccountsResponse(accounts=accounts)

    def delete(self, request: iam_admin_v1.DeleteServiceAccountRequest, context: grpc.ServicerContext):
        account = self._lookup(request.name)
        with self.state.transaction() as tables:
            tables["service_accounts"].pop(account.email, None)
        self.access.service_account_deleted(account.email, account.unique_id)
        return empty_pb2.Empty()

    def disable(self, request: iam_admin_v1.DisableServiceAccountRequest, context: grpc.ServicerContext):
        return self._set_disabled(request.name, True, "iam.serviceAccounts.disable")

    def enable(self, request: iam_admin_v1.EnableServiceAccountRequest, context: grpc.ServicerContext):
        return self._set_disabled(request.name, False, "iam.serviceAccounts.enable")

    def _set_disabled(self, name: str, disabled: bool, permission: str) -> empty_pb2.Empty:
        try:
            account = self._lookup(name)
        except ApiError as error:
            if error.code != grpc.StatusCode.NOT_FOUND:
                raise
            raise permission_denied(
                f"Permission '{permission}' denied on resource '{name}' (or it may not exist)."
            ) from None
        with self.state.transaction() as tables:
            stored = tables["service_accounts"].get(account.email)
            if stored is not None:
                stored["disabled"] = disabled
        return empty_pb2.Empty()

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.iam.admin.v1.IAM",
            [
                Method(
                    "CreateServiceAccount",
                    self.create,
                    iam_admin_v1.CreateServiceAccountRequest,
                    iam_admin_v1.ServiceAccount,
                ),
                Method(
                    "GetServiceAccount",
                    self.get,
                    iam_admin_v1.GetServiceAccountRequest,
                    iam_admin_v1.ServiceAccount,
                ),
                Method(
                    "ListServiceAccounts",
                    self.list,
                    iam_admin_v1.ListServiceAccountsRequest,
                    iam_admin_v1.ListServiceAccountsResponse,
                ),
                Method(
                    "DeleteServiceAccount",
                    self.delete,
                    iam_admin_v1.DeleteServiceAccountRequest,
                    empty_pb2.Empty,
                ),
                Method(
                    "DisableServiceAccount",
                    self.disable,
                    iam_admin_v1.DisableServiceAccountRequest,
                    empty_pb2.Empty,
                ),
                Method(
                    "EnableServiceAccount",
                    self.enable,
                    iam_admin_v1.EnableServiceAccountRequest,
                    empty_pb2.Empty,
                ),
            ],
            hub,
        )
