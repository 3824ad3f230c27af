"""A local stand-in for the Hugging Face Hub's HTTP API, enough for the real huggingface_hub client.

It answers what `HfApi.model_info` / `dataset_info` (with `files_metadata`), `list_repo_tree`,
`hf_hub_download` and `snapshot_download` call: repo info with siblings, sizes, blob ids and LFS sha256;
the tree listing; `resolve` with HEAD and ranged GET and the X-Repo-Commit / ETag / X-Linked-* headers.
Errors carry the X-Error-Code / X-Error-Message headers huggingface_hub maps to its exception types:
GatedRepo, RepoNotFound, RevisionNotFound, EntryNotFound, and 401 "Invalid credentials" for a bad token.

Every request is recorded (without the token) so tests can assert what was fetched, and a GET can be
cut after some bytes once, to exercise resuming with a Range request.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

from launcher.emulator.http_errors import LoggedErrors

_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"
_INFO = re.compile(rf"^/api/(?P<type>models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE = re.compile(rf"^/api/(?P<type>models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_RESOLVE = re.compile(rf"^/(?P<datasets>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")
_PIECE = 1 << 20
LFS_THRESHOLD = 10 * 1024  # files at least this large are stored with LFS, as the Hub does for weights


@dataclass
class HubFile:
    content: bytes
    lfs: bool
    served: bytes | None = None  # what resolve sends instead of `content`, to test hash verification

    @cached_property
    def blob_id(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.content) + self.content).hexdigest()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str
    commits: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    granted: set[str] = field(default_factory=set)  # tokens whose account accepted the licence

    @property
    def files(self) -> dict[str, HubFile]:
        """The files on main."""
        return self.commits[self.branches["main"]]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authenticated: bool


class HubStandin:
    """`with HubStandin(tokens={"hf_good"}) as hub: hub.add_repo(...)`; `hub.endpoint` is the HF_ENDPOINT."""

    def __init__(self, tokens: set[str] | None = None) -> None:
        self.tokens = set(tokens or ())
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.requests: list[Request] = []
        self._cuts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubStandin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        repo_type: str = "model",
        gated: bool = False,
        granted: set[str] | None = None,
        branch: str = "main",
    ) -> str:
        """Commit these files to `branch` (creating the repo); older commits stay reachable by sha."""
        hub_files = {path: HubFile(content, len(content) >= LFS_THRESHOLD) for path, content in files.items()}
        tree = hashlib.sha1()
        for path in sorted(hub_files):
            tree.update(path.encode() + b"\0" + hub_files[path].etag.encode())
        commit = tree.hexdigest()
        repo = self.repos.setdefault((repo_type, repo_id), HubRepo(repo_id, repo_type))
        repo.commits[commit] = hub_files
        repo.branches[branch] = commit
        repo.gated = gated
        repo.granted = set(granted or ())
        return commit

    def cut_next_download(self, path: str, after_bytes: int) -> None:
        """The next GET of `path` (a repo file path) drops the connection after `after_bytes` bytes."""
        with self._lock:
            self._cuts[path] = after_bytes

    def downloads(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def _record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            return self._cuts.pop(path, None)


class _Server(LoggedErrors, ThreadingHTTPServer):
    pass


class _Reply(Exception):
    def __init__(self, status: HTTPStatus, code: str | None = None, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _handler(hub: HubStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def _serve(self, *, head: bool) -> None:
            url = urlparse(self.path)
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
            hub._record(Request(self.command, url.path, self.headers.get("Range"), token is not None))
            try:
                if token is not None and token not in hub.tokens:
                    raise _Reply(HTTPStatus.UNAUTHORIZED, None, "Invalid credentials in Authorization header")
                if match := _INFO.match(url.path):
                    self._info(match, parse_qs(url.query))
                elif match := _TREE.match(url.path):
                    self._tree(match)
                elif match := _RESOLVE.match(url.path):
                    self._resolve(match, token, head)
                else:
                    raise _Reply(HTTPStatus.NOT_FOUND, None, "Not found")
            except _Reply as reply:
                body = json.dumps({"error": reply.message}).encode()
                self.send_response(reply.status)
                if reply.code:
                    self.send_header("X-Error-Code", reply.code)
                self.send_header("X-Error-Message", reply.message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

        def _repo(self, repo_type: str, repo_id: str, revision: str | None) -> tuple[HubRepo, str]:
            repo = hub.repos.get((repo_type, unquote(repo_id)))
            if repo is None:
                raise _Reply(HTTPStatus.NOT_FOUND, "RepoNotFound", "Repository not found")
            revision = unquote(revision or "main")
            commit = repo.branches.get(revision, revision if revision in repo.commits else None)
            if commit is None:
                raise _Reply(HTTPStatus.NOT_FOUND, "RevisionNotFound", f"Invalid rev id: {revision}")
            return repo, commit

        def _info(self, match: re.Match[str], query: dict[str, list[str]]) -> None:
            repo_type = match["type"].removesuffix("s")
            repo, commit = self._repo(repo_type, match["repo"], match["rev"])
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for path, hub_file in sorted(repo.commits[commit].items()):
                sibling: dict[str, object] = {"rfilename": path}
                if blobs:
                    sibling.update(size=len(hub_file.content), blobId=hub_file.blob_id)
                    if hub_file.lfs:
                        sibling["lfs"] = {
                            "size": len(hub_file.content),
                            "sha256": hub_file.sha256,
                            "pointerSize": 134,
                        }
                siblings.append(sibling)
            # The Hub serves a repo card's YAML metadata (README.md between --- lines) as cardData.
            readme = repo.commits[commit].get("README.md")
            card = None
            if readme is not None and readme.content.startswith(b"---\n"):
                card = yaml.safe_load(readme.content.split(b"\n---", 1)[0].removeprefix(b"---\n"))
            self._json(
                {
                    **({"cardData": card} if isinstance(card, dict) else {}),
                    "_id": commit[:24],
                    "id": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": commit,
                    "private": False,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "lastModified": "2025-03-12T00:00:00.000Z",
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "siblings": siblings,
                }
            )

        def _tree(self, match: re.Match[str]) -> None:
            repo, commit = self._repo(match["type"].removesuffix("s"), match["repo"], match["rev"])
            under = (match["path"] or "").strip("/")
            entries = []
            for path, hub_file in sorted(repo.commits[commit].items()):
                if under and not path.startswith(under + "/"):
                    continue
                entry: dict[str, object] = {
                    "type": "file",
                    "oid": hub_file.blob_id,
                    "size": len(hub_file.content),
                    "path": path,
                }
                if hub_file.lfs:
                    entry["lfs"] = {"oid": hub_file.sha256, "size": len(hub_file.content), "pointerSize": 134}
                entries.append(entry)
            self._json(entries)

        def _resolve(self, match: re.Match[str], token: str | None, head: bool) -> None:
            repo_type = "dataset" if match["datasets"] else "model"
            repo, commit = self._repo(repo_type, match["repo"], match["rev"])
            if repo.gated and token not in repo.granted:
                raise _Reply(
                    HTTPStatus.FORBIDDEN if token else HTTPStatus.UNAUTHORIZED,
                    "GatedRepo",
                    f"Access to model {repo.repo_id} is restricted and you are not in the authorized list. "
                    f"Visit https://huggingface.co/{repo.repo_id} to ask for access.",
                )
            path = unquote(match["path"])
            hub_file = repo.commits[commit].get(path)
            if hub_file is None:
                raise _Reply(HTTPStatus.NOT_FOUND, "EntryNotFound", f"{path} does not exist on {commit}")
            content = hub_file.content if hub_file.served is None else hub_file.served
            start, end = 0, len(content)
            status = HTTPStatus.OK
            if (requested := self.headers.get("Range")) and (ranged := _RANGE.match(requested)):
                start = int(ranged["start"])
                end = min(len(content), int(ranged["end"]) + 1) if ranged["end"] else len(content)
                if start >= len(content) and len(content):
                    raise _Reply(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, None, "Range not satisfiable")
                status = HTTPStatus.PARTIAL_CONTENT
            self.send_response(status)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hub_file.blob_id}"')
            if hub_file.lfs:
                self.send_header("X-Linked-Size", str(len(content)))
                self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(content)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            if head:
                return
            cut = hub._take_cut(path)
            stop = end if cut is None else min(end, start + cut)
            view = memoryview(content)
            for offset in range(start, stop, _PIECE):
                self.wfile.write(view[offset : min(stop, offset + _PIECE)])
            if cut is not None:
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)

        def _json(self, document: object) -> None:
            body = json.dumps(document).encode()
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler
