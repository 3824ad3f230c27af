"""The metadata server a Cloud Run task asks for its identity, so ADC finds the job's service account.

Cloud Run's container contract (https://cloud.google.com/run/docs/container-contract#metadata-server)
serves /computeMetadata/v1/... to each instance, answering only requests that carry
`Metadata-Flavor: Google`. google-auth's ADC looks there when GCE_METADATA_HOST / GCE_METADATA_IP
name it (google.auth.environment_vars), so the trainer and the staging worker run unchanged: their
access tokens are ones the emulator issued to the job's service account, and every API checks them.
It answers `instance/region` as the contract's table gives it, "projects/PROJECT-NUMBER/regions/REGION":
the trainer records the region in results.json.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

from launcher.emulator.access import Access
from launcher.emulator.http_errors import LoggedErrors

_TOKEN_LIFETIME_S = 3599


class _Server(LoggedErrors, ThreadingHTTPServer):
    pass


class MetadataServer:
    def __init__(self, access: Access, project: str, email: str, region: str) -> None:
        self.email = email
        token = access.issue_token(f"serviceAccount:{email}")
        account = {
            "email": email,
            "aliases": ["default"],
            "scopes": ["https://www.googleapis.com/auth/cloud-platform"],
        }
        root = "/computeMetadata/v1/"
        number = access.project(project)["number"]
        self._answers: dict[str, str | dict] = {
            root + "project/project-id": access.project_id(project),
            root + "project/numeric-project-id": number,
            root + "instance/region": f"projects/{number}/regions/{region}",
            root + "instance/service-accounts/default/email": email,
            root + f"instance/service-accounts/{email}/email": email,
            root + "instance/service-accounts/default/": account,
            root + f"instance/service-accounts/{email}/": account,
            root + "instance/service-accounts/default/scopes": "\n".join(account["scopes"]),
            root + "instance/service-accounts/default/token": {
                "access_token": token,
                "expires_in": _TOKEN_LIFETIME_S,
                "token_type": "Bearer",
            },
            root + f"instance/service-accounts/{email}/token": {
                "access_token": token,
                "expires_in": _TOKEN_LIFETIME_S,
                "token_type": "Bearer",
            },
        }
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metadata", daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    def environment(self) -> dict[str, str]:
        """What a task's environment needs for google-auth to find this server."""
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host}

    def start(self) -> MetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        answers = self._answers

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._send(403, "text/html", "Missing Metadata-Flavor:Google header.")
                    return
                path = urlparse(self.path).path
                if path in ("", "/"):
                    self._send(200, "application/text", "computeMetadata/\n")
                    return
                answer = answers.get(path) or answers.get(path.rstrip("/") + "/")
                if answer is None:
                    self._send(404, "text/html", "Not found.")
                elif isinstance(answer, dict):
                    self._send(200, "application/json", json.dumps(answer))
                else:
                    self._send(200, "application/text", answer)

            def _send(self, status: int, content_type: str, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: the task's own log is what matters."""

        return Handler
