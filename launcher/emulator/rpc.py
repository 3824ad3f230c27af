"""gRPC plumbing shared by every emulated service.

A service module lists its methods as `Method`s (handler + the client library's own request and
response classes); `service_handler` turns them into a grpc generic handler that decodes requests,
records them, injects faults and maps `ApiError` to the status a real API would answer with.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import proto
from google.iam.v1 import iam_policy_pb2, policy_pb2
from google.protobuf import any_pb2, json_format
from google.rpc import status_pb2
from grpc_status import rpc_status

from launcher.emulator.faults import Faults
from launcher.emulator.record import Record, mutates


class ApiError(Exception):
    """Raised by handlers; reaches the client as the usual google.api_core exception for `code`.

    `details` (e.g. an ErrorInfo) travel as Google's rich error details, which google-api-core exposes
    as the exception's `details`, `reason` and `metadata`.
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: list[Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or []

    def abort(self, context: grpc.ServicerContext) -> None:
        if not self.details:
            context.abort(self.code, self.message)
        packed = []
        for detail in self.details:
            item = any_pb2.Any()
            item.Pack(detail)
            packed.append(item)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        context.abort_with_status(rpc_status.to_status(status))


def not_found(what: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"{what} was not found.")


def already_exists(what: str) -> ApiError:
    return ApiError(grpc.StatusCode.ALREADY_EXISTS, f"{what} already exists.")


def invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def failed_precondition(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def permission_denied(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.PERMISSION_DENIED, message)


@dataclass(frozen=True)
class Method:
    name: str
    handler: Callable[..., Any]
    request: type
    response: type
    # "unary" | "unary_stream" (handler yields responses) | "stream_stream" (handler takes an iterator)
    kind: str = "unary"

    @property
    def mutating(self) -> bool:
        return mutates(self.name)


def iam_policy_methods(
    get: Callable[..., Any], set_: Callable[..., Any], test: Callable[..., Any] | None = None
) -> list[Method]:
    """google.iam.v1's GetIamPolicy, SetIamPolicy and (when given) TestIamPermissions, as every API
    with per-resource policies serves them."""
    methods = [
        Method("GetIamPolicy", get, iam_policy_pb2.GetIamPolicyRequest, policy_pb2.Policy),
        Method("SetIamPolicy", set_, iam_policy_pb2.SetIamPolicyRequest, policy_pb2.Policy),
    ]
    if test is not None:
        methods.append(
            Method(
                "TestIamPermissions",
                test,
                iam_policy_pb2.TestIamPermissionsRequest,
                iam_policy_pb2.TestIamPermissionsResponse,
            )
        )
    return methods


def to_dict(message: Any) -> dict[str, Any]:
    """The JSON form of a proto-plus or protobuf message, field names as in the REST API."""
    if isinstance(message, proto.Message):
        return json.loads(type(message).to_json(message))
    return json_format.MessageToDict(message)


def _decoder(cls: type) -> Callable[[bytes], Any]:
    if issubclass(cls, proto.Message):
        return cls.deserialize
    return cls.FromString


def _encoder(cls: type) -> Callable[[Any], bytes]:
    if issubclass(cls, proto.Message):
        return cls.serialize
    # Not Message.SerializeToString: that is the abstract base method, which raises for every message.
    return lambda message: message.SerializeToString()


class Hub:
    """What every handler needs besides its request: the record, the faults and the access checks.

    `gate(method, request_dict, authorization)` raises ApiError when the caller may not make the call
    (launcher/emulator/access.py); without one every call is allowed.
    """

    def __init__(
        self, record: Record, faults: Faults, gate: Callable[[str, dict, str | None], None] | None = None
    ) -> None:
        self.record = record
        self.faults = faults
        self.gate = gate


def service_handler(service: str, methods: list[Method], hub: Hub) -> grpc.GenericRpcHandler:
    """A generic handler for `service` (e.g. "google.cloud.run.v2.Jobs")."""
    handlers = {}
    for method in methods:
        wrapped = _wrap(service, method, hub)
        decode, encode = _decoder(method.request), _encoder(method.response)
        if method.kind == "unary":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(wrapped, decode, encode)
        elif method.kind == "unary_stream":
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(wrapped, decode, encode)
        elif method.kind == "stream_stream":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(wrapped, decode, encode)
        else:
            raise ValueError(f"unknown method kind {method.kind!r}")
    return grpc.method_handlers_generic_handler(service, handlers)


def _wrap(service: str, method: Method, hub: Hub) -> Callable[..., Any]:
    full_name = f"{service}/{method.name}"

    def refuse_or_record(request: Any, context: grpc.ServicerContext) -> None:
        refusal = hub.faults.refusal()
        denial = None
        if refusal is None and hub.gate is not None:
            try:
                hub.gate(full_name, request, dict(context.invocation_metadata()).get("authorization"))
            except ApiError as error:
                denial = error
        outcome = refusal.name if refusal else denial.code.name if denial else "OK"
        hub.record.append(service, method.name, request, outcome=outcome)
        if refusal:
            context.abort(refusal, f"Injected fault on {full_name}.")
        if denial:
            denial.abort(context)

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        refuse_or_record(to_dict(request), context)
        try:
            response = method.handler(request, context)
        except ApiError as error:
            error.abort(context)
        if method.mutating and hub.faults.reply_lost():
            context.abort(grpc.StatusCode.UNAVAILABLE, f"Injected lost reply on {full_name}.")
        return response

    def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        refuse_or_record(to_dict(request), context)
        try:
            yield from method.handler(request, context)
        except ApiError as error:
            error.abort(context)

    def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        first = next(requests, None)
        if first is None:
            return
        refuse_or_record(to_dict(first), context)
        try:
            yield from method.handler(first, requests, context)
        except ApiError as error:
            error.abort(context)

    return {"unary": unary, "unary_stream": unary_stream, "stream_stream": stream_stream}[method.kind]
