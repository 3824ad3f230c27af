"""google.longrunning.Operations, shared by every service whose mutations are long-running.

An operation can finish after a delay, so clients really poll GetOperation as they do in the cloud.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

import grpc
import proto
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, empty_pb2

from launcher.emulator.rpc import Hub, Method, not_found, service_handler
from launcher.emulator.state import State


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(type(message).pb(message) if isinstance(message, proto.Message) else message)
    return packed


class Operations:
    def __init__(self, state: State, delay_s: float = 0.0) -> None:
        self.state = state
        self.delay_s = delay_s

    def start(self, parent: str, response: Any, metadata: Any | None = None) -> operations_pb2.Operation:
        """Record an operation under `parent` (projects/P/locations/L) whose result is `response`."""
        operation = operations_pb2.Operation(name=f"{parent}/operations/{uuid.uuid4()}")
        operation.response.CopyFrom(_pack(response))
        if metadata is not None:
            operation.metadata.CopyFrom(_pack(metadata))
        done_at = time.time() + self.delay_s
        with self.state.transaction() as tables:
            tables["operations"][operation.name] = {
                "done_at": done_at,
                "operation": base64.b64encode(operation.SerializeToString()).decode(),
            }
        return self._view(operation, done_at)

    def get(self, request: operations_pb2.GetOperationRequest, context: grpc.ServicerContext):
        entry = self.state.table("operations").get(request.name)
        if entry is None:
            raise not_found(f"Operation {request.name}")
        operation = operations_pb2.Operation.FromString(base64.b64decode(entry["operation"]))
        return self._view(operation, entry["done_at"])

    def wait(self, request: operations_pb2.WaitOperationRequest, context: grpc.ServicerContext):
        entry = self.state.table("operations").get(request.name)
        if entry is None:
            raise not_found(f"Operation {request.name}")
        time.sleep(max(0.0, entry["done_at"] - time.time()))
        return self.get(operations_pb2.GetOperationRequest(name=request.name), context)

    def delete(self, request: operations_pb2.DeleteOperationRequest, context: grpc.ServicerContext):
        with self.state.transaction() as tables:
            tables["operations"].pop(request.name, None)
        return empty_pb2.Empty()

    @staticmethod
    def _view(operation: operations_pb2.Operation, done_at: float) -> operations_pb2.Operation:
        view = operations_pb2.Operation()
        view.CopyFrom(operation)
        if time.time() < done_at:
            view.ClearField("response")
        else:
            view.done = True
        return view

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.longrunning.Operations",
            [
                Method(
                    "GetOperation", self.get, operations_pb2.GetOperationRequest, operations_pb2.Operation
                ),
                Method(
                    "WaitOperation", self.wait, operations_pb2.WaitOperationRequest, operations_pb2.Operation
                ),
                Method(
                    "DeleteOperation",
                    self.delete,
                    operations_pb2.DeleteOperationRequest,
                    empty_pb2.Empty,
                ),
            ],
            hub,
        )
