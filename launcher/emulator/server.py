"""The local cloud: one gRPC server for the emulated Google APIs, plus the storage emulator.

`gemma-launch emulator start` runs `Emulator.serve()`; tests use `Emulator` as a context manager.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from collections.abc import Collection
from concurrent import futures
from functools import partial
from http.server import HTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from gcp_storage_emulator.server import RequestHandler, create_server

from launcher.emulator.access import DEFAULT_ENABLED, DEFAULT_USER, Access
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.billing_catalog import Catalog
from launcher.emulator.cloudbuild import RESTRICTED_REGIONS, CloudBuild
from launcher.emulator.faults import Faults
from launcher.emulator.http_errors import LoggedErrors
from launcher.emulator.iam import Iam
from launcher.emulator.logging import READ_QUOTA, READ_WINDOW_S, Logging, ReadQuota
from launcher.emulator.operations import Operations
from launcher.emulator.quotas import Quotas
from launcher.emulator.record import Record
from launcher.emulator.resourcemanager import Billing, Projects
from launcher.emulator.rpc import Hub
from launcher.emulator.run_api import RunService
from launcher.emulator.secretmanager import SecretManager
from launcher.emulator.serviceusage import ServiceUsage
from launcher.emulator.state import State
from launcher.emulator.storage import CloudStorage
from launcher.errors import UserError


class Emulator:
    def __init__(
        self,
        *,
        port: int = 0,
        storage_port: int = 0,
        data_dir: Path | None = None,
        faults: str | None = None,
        record: Path | None = None,
        operation_delay_s: float = 0.2,
        user: str = DEFAULT_USER,
        iam_propagation_s: float = 2.0,
        api_propagation_s: float = 0.0,
        grant_propagation_s: float = 0.0,
        enabled_apis: tuple[str, ...] = tuple(DEFAULT_ENABLED),
        billing: bool = True,
        build_regions: Collection[str] | None = RESTRICTED_REGIONS,
        gpu_quota: int = 0,
        log_read_quota: int = READ_QUOTA,
        log_read_window_s: float = READ_WINDOW_S,
    ) -> None:
        """A fresh project's rules: APIs off but Google's defaults, `user` the owner of every project it
        names, a new service account unknown to IAM policies for `iam_propagation_s`, an API just enabled
        still answering SERVICE_DISABLED for `api_propagation_s`, a role just granted not in effect for
        `grant_propagation_s`, billing on, and
        CreateBuild accepted in `global` and `build_regions` only (None: everywhere), and at most
        `log_read_quota` ListLogEntries calls per project in any `log_read_window_s` seconds."""
        # A port in use is refused before any server binds: the storage server binds in its own thread,
        # where it would wait forever, and gRPC logs its own failure to stderr first.
        for flag, asked in (("--port", port), ("--storage-port", storage_port)):
            if asked and not _free(asked):
                raise _port_in_use(flag, asked)
        # Without SO_REUSEPORT, gRPC's default on Linux, a second emulator that binds the port between
        # that check and this one fails instead of sharing it, each answering from its own state.
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32), options=[("grpc.so_reuseport", 0)]
        )
        try:
            self.port = self._grpc.add_insecure_port(f"127.0.0.1:{port}")
        except RuntimeError:
            raise _port_in_use("--port", port) from None
        if data_dir is None:
            data_dir = Path(tempfile.mkdtemp(prefix="gemma-launch-emulator-"))
        self.data_dir = data_dir.resolve()
        self.state = State(self.data_dir)
        self.access = Access(
            self.state,
            user=user,
            propagation_s=iam_propagation_s,
            api_propagation_s=api_propagation_s,
            grant_propagation_s=grant_propagation_s,
            enabled_apis=enabled_apis,
            billing_enabled=billing,
        )
        self.hub = Hub(Record(record), Faults.parse(faults), gate=self.access.gate)
        self.operations = Operations(self.state, delay_s=operation_delay_s)
        self.storage_root = self.data_dir / "storage"
        self._storage_server = create_server(
            "127.0.0.1", storage_port or _free_port(), in_memory=False, data_dir=str(self.storage_root)
        )
        self.storage_port = self._storage_server._api._port
        self._storage_server._api.run = partial(_serve_storage, self._storage_server._api)
        iam = Iam(self.state, self.access)
        logging = Logging(self.data_dir, ReadQuota(log_read_quota, log_read_window_s))
        secrets = SecretManager(self.state, self.access)
        registry = ArtifactRegistry(self.state, self.operations, self.access)
        storage = CloudStorage(self._storage_server._storage, self.hub.record, self.storage_host, self.access)
        quotas = Quotas(gpu_quota)
        builds = CloudBuild(
            self.state,
            access=self.access,
            storage=storage,
            registry=registry,
            logging=logging,
            data_dir=self.data_dir,
            build_regions=None if build_regions is None else frozenset(build_regions),
        )
        run = RunService(
            self.state,
            self.operations,
            access=self.access,
            iam=iam,
            storage=storage,
            secrets=secrets,
            registry=registry,
            builds=builds,
            quotas=quotas,
            logging=logging,
            data_dir=self.data_dir,
        )
        self.services = {
            "iam": iam,
            "serviceusage": ServiceUsage(self.access, self.operations),
            "projects": Projects(self.access),
            "billing": Billing(self.access),
            "catalog": Catalog(),
            "logging": logging,
            "secrets": secrets,
            "registry": registry,
            "storage": storage,
            "quotas": quotas,
            "run": run,
            "builds": builds,
        }
        handlers = [self.operations.handler(self.hub)]
        handlers += [service.handler(self.hub) for service in self.services.values()]
        self._grpc.add_generic_rpc_handlers(handlers)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage_host(self) -> str:
        return f"http://127.0.0.1:{self.storage_port}"

    def bucket_dir(self, bucket: str) -> Path:
        """Where the storage emulator keeps a bucket's objects as plain files (the GCS mount's target)."""
        return self.services["storage"].bucket_dir(bucket)

    def start(self) -> Emulator:
        self._storage_server.start()
        self._grpc.start()
        return self

    def stop(self) -> None:
        for service in self.services.values():
            shutdown = getattr(service, "shutdown", None)
            if shutdown:
                shutdown()
        self._grpc.stop(grace=1).wait()
        self._storage_server.stop()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve(self) -> None:
        """Run in the foreground until SIGINT or SIGTERM, printing the exports first."""
        stopping = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stopping.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        self.start()
        print(f"export GEMMA_LAUNCH_EMULATOR_HOST={self.host}", flush=True)
        print(f"export STORAGE_EMULATOR_HOST={self.storage_host}", flush=True)
        print(f"# state in {self.data_dir}; Ctrl-C to stop", file=sys.stderr, flush=True)
        try:
            stopping.wait()
        finally:
            self.stop()


class _StorageServer(LoggedErrors, HTTPServer):
    pass


def _serve_storage(api: Any) -> None:
    """The storage package's APIThread.run, polling for shutdown every 20 ms instead of socketserver's
    default 0.5 s: every emulator stop waited that out, some 250 stops (two minutes) per test suite."""
    api._httpd = _StorageServer((api._host, api._port), partial(RequestHandler, api._storage))
    api.is_running.set()
    api._httpd.serve_forever(poll_interval=0.02)


def _port_in_use(flag: str, port: int) -> UserError:
    return UserError(
        f"Port {port} ({flag}) is in use on 127.0.0.1, by another emulator or another program.",
        f"Stop that one (Ctrl-C in its shell), or leave out {flag} for a free port.",
    )


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HTTPServer binds: a listener only
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
