"""Storage: the gcp-storage-emulator package, made to behave like GCS where the launcher relies on it.

The package is not forked: its route table (`gcp_storage_emulator.server.HANDLERS`, a tuple of
(regex, {HTTP method: handler}) with mutable dicts) gets our handlers installed in place, once per
process. Handlers receive the package's `Storage` object, which is how they find the emulator it
belongs to (creating a `CloudStorage` registers it), so several emulators can share one process.

- every request is first checked like GCS checks it (launcher/emulator/storage_iam.py: credentials,
  the API enabled, IAM on the project and the bucket), and bucket policies are validated on write;
- object names and request preconditions (ifGenerationMatch ...) are checked as GCS checks them;
- buckets.insert validates names and locations like GCS and keeps location, uniform bucket-level
  access, labels and the project it was created in;
- every JSON API request is appended to the emulator's record as service "storage", method like
  "objects.insert", request {"path", "query", "params", "resource"}: "query" as parse_qs gives it
  (values are lists), "params" the bucket and object names decoded, "resource" the JSON metadata sent
  (a bucket, an object's metadata, a policy) when there is one. Object contents are never recorded;
- `CloudStorage.import_tree` turns files written straight into a bucket's directory (as the GCS FUSE
  mount of a Cloud Run job does) into objects;
- the emulator's faults apply here too: a refused request gets the status's HTTP equivalent (503, 504,
  429 ...) in GCS's error format before anything is done, and a mutating request whose reply is `lost`
  is carried out, then answered 503. Both are recorded with that status as the outcome.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import mimetypes
import os
import re
import threading
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
from gcp_storage_emulator import server as gcs_server
from gcp_storage_emulator import settings as gcs_settings
from gcp_storage_emulator.handlers import buckets, objects
from gcp_storage_emulator.storage import Storage

from launcher.emulator import storage_iam
from launcher.emulator.access import Access, project_number, rename_member
from launcher.emulator.faults import HTTP_STATUS, Faults
from launcher.emulator.record import Record, mutates
from launcher.emulator.rpc import Hub, not_found

Handler = Callable[..., Any]

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_MULTI_REGIONS = {"US", "EU", "ASIA"}
_DUAL_REGIONS = {"NAM4", "EUR4", "ASIA1", "EUR5", "EUR7", "EUR8"}
_REGION = re.compile(r"^[A-Z]+-[A-Z]+\d+$")
_ORIGIN = re.compile(r"^https?://[^/]+")
_LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
# GCS locks uniform bucket-level access in after 90 days; the bucket says when.
_UBLA_LOCK = timedelta(days=90)


_EMULATED: weakref.WeakKeyDictionary[Storage, CloudStorage] = weakref.WeakKeyDictionary()


def _not_a_missing_object(record: logging.LogRecord) -> bool:
    # The package logs each read of a missing object as an error ("Resource not found:", then the
    # OSError) before answering 404: an answer the launcher expects, not a fault of the emulator.
    return record.msg != "Resource not found:" and not isinstance(record.msg, OSError)


logging.getLogger("gcp_storage_emulator.storage").addFilter(_not_a_missing_object)


# ---- buckets.insert -------------------------------------------------------------------------------


def _error(response: Any, status: HTTPStatus, reason: str, message: str) -> None:
    response.status = status
    response.json(
        {
            "error": {
                "code": status.value,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": reason}],
            }
        }
    )


def bucket_name_ok(name: str) -> bool:
    """GCS's bucket naming rules (https://cloud.google.com/storage/docs/buckets#naming)."""
    if not _BUCKET_NAME.match(name):
        return False
    if "." in name:
        parts = name.split(".")
        if len(name) > 222 or any(not 0 < len(part) <= 63 for part in parts):
            return False
    elif not 3 <= len(name) <= 63:
        return False
    if name.startswith("goog") or "google" in name or "g00gle" in name:
        return False
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return True
    return False


def _location_type(location: str) -> str | None:
    if location in _MULTI_REGIONS:
        return "multi-region"
    if location in _DUAL_REGIONS:
        return "dual-region"
    if _REGION.match(location):
        return "region"
    return None


def _insert_bucket(request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any) -> None:
    body = request.data if isinstance(request.data, dict) else {}
    name = str(body.get("name") or "")
    project = (request.query.get("project") or [""])[0]
    if not project:
        return _error(response, HTTPStatus.BAD_REQUEST, "required", "Required parameter: project")
    if not bucket_name_ok(name):
        return _error(response, HTTPStatus.BAD_REQUEST, "invalid", f"Invalid bucket name: '{name}'")
    location = str(body.get("location") or "US").upper()
    location_type = _location_type(location)
    if location_type is None:
        return _error(
            response, HTTPStatus.BAD_REQUEST, "invalid", "The specified location constraint is not valid."
        )
    labels = body.get("labels") or {}
    for key, value in labels.items():
        if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(str(value)):
            return _error(response, HTTPStatus.BAD_REQUEST, "invalid", f"Invalid label: '{key}'")
    if storage.get_bucket(name):
        response.status = HTTPStatus.CONFLICT
        return response.json(buckets.CONFLICT)

    bucket = buckets._make_bucket_resource(name, project_number=project_number(project))
    # The package's patch applies every other writable field (storageClass, versioning, acl ...).
    buckets._patch_bucket(bucket, body)
    bucket["metageneration"] = "1"
    bucket["location"] = location
    bucket["locationType"] = location_type
    if labels:
        bucket["labels"] = labels
    requested = body.get("iamConfiguration") or {}
    uniform = bool((requested.get("uniformBucketLevelAccess") or {}).get("enabled"))
    access: dict[str, Any] = {"enabled": uniform}
    if uniform:
        locked = datetime.fromisoformat(bucket["timeCreated"].replace("Z", "+00:00")) + _UBLA_LOCK
        access["lockedTime"] = locked.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    bucket["iamConfiguration"] = {
        "bucketPolicyOnly": dict(access),
        "uniformBucketLevelAccess": access,
        "publicAccessPrevention": requested.get("publicAccessPrevention", "inherited"),
    }
    storage.create_bucket(name, bucket)
    response.json(bucket)


# Object naming (https://cloud.google.com/storage/docs/objects#naming): 1-1024 bytes of UTF-8, no
# carriage return or line feed, not "." or "..", and not under ".well-known/acme-challenge/".
_MAX_OBJECT_NAME_BYTES = 1024


def _object_name_problem(name: str) -> str | None:
    if not name:
        return "Required object name."
    if len(name.encode()) > _MAX_OBJECT_NAME_BYTES:
        return f"The object name is {len(name.encode())} bytes long; the maximum is {_MAX_OBJECT_NAME_BYTES}."
    if "\r" in name or "\n" in name:
        return "Object names cannot contain carriage return or line feed characters."
    if name in (".", "..") or name.startswith(".well-known/acme-challenge/"):
        return f"Invalid object name: {name!r}."
    return None


def _new_object_name(request: Any) -> str | None:
    """The name an objects.insert creates, None for the later requests of a resumable upload."""
    if "upload_id" in request.query:
        return None
    data = request.data
    if isinstance(data, dict):
        meta = data.get("meta") if "meta" in data else data
        if isinstance(meta, dict) and meta.get("name"):
            return meta["name"]
    return (request.query.get("name") or [""])[0] or request.params.get("object_id") or ""


# Request preconditions (https://cloud.google.com/storage/docs/request-preconditions and each object
# method's query parameters in https://cloud.google.com/storage/docs/json_api/v1/objects):
# ifGenerationMatch (0: only if no live object), ifGenerationNotMatch, ifMetagenerationMatch and
# ifMetagenerationNotMatch; one that does not hold is 412 conditionNotMet
# (https://cloud.google.com/storage/docs/json_api/v1/status-codes#412_Precondition_Failed), except a
# read whose ...NotMatch condition fails: the object is the one the reader already has, so the answer
# is 304 Not Modified with no body
# (https://cloud.google.com/storage/docs/json_api/v1/status-codes#304_Not_Modified). As in HTTP's own
# conditional requests (RFC 9110, section 13.2.2), a failed ...Match is checked first and stays 412.
_PRECONDITION_METHODS = {"objects.insert", "objects.get", "objects.delete", "objects.patch"}


def _precondition_refusal(method: str, request: Any, storage: Storage) -> HTTPStatus | None:
    """PRECONDITION_FAILED or NOT_MODIFIED when a precondition of `request` does not hold, else None."""
    if method == "objects.insert":
        name = _new_object_name(request)
        if name is None:  # a later request of a resumable upload: checked when the session started
            return None
    else:
        name = request.params.get("object_id") or ""
    stored = storage.objects.get(request.params.get("bucket_name") or "", {}).get(name)
    if stored is None and method != "objects.insert":
        return None  # the handler answers 404
    generation = str(stored.get("generation") or "0") if stored else "0"
    metageneration = str(stored.get("metageneration") or "1") if stored else None

    def failed(parameter: str, holds: Callable[[str], bool]) -> bool:
        value = (request.query.get(parameter) or [None])[0]
        return value is not None and not holds(value)

    if failed("ifGenerationMatch", lambda value: value == generation) or failed(
        "ifMetagenerationMatch", lambda value: value == metageneration
    ):
        return HTTPStatus.PRECONDITION_FAILED
    if failed("ifGenerationNotMatch", lambda value: value != generation) or failed(
        "ifMetagenerationNotMatch", lambda value: value != metageneration
    ):
        return HTTPStatus.NOT_MODIFIED if method == "objects.get" else HTTPStatus.PRECONDITION_FAILED
    return None


# ---- the request record ---------------------------------------------------------------------------

_METHODS: dict[Handler, str] = {
    buckets.ls: "buckets.list",
    buckets.insert: "buckets.insert",
    buckets.get: "buckets.get",
    buckets.delete: "buckets.delete",
    buckets.patch: "buckets.patch",
    buckets.acl_list: "bucketAccessControls.list",
    buckets.default_object_acl_list: "defaultObjectAccessControls.list",
    buckets.get_iam_policy: "buckets.getIamPolicy",
    buckets.set_iam_policy: "buckets.setIamPolicy",
    buckets.test_iam_permissions: "buckets.testIamPermissions",
    objects.ls: "objects.list",
    objects.get: "objects.get",
    objects.download: "objects.get",
    objects.insert: "objects.insert",
    objects.upload_partial: "objects.insert",
    objects.xml_upload: "objects.insert",
    objects.delete: "objects.delete",
    objects.patch: "objects.patch",
    objects.copy: "objects.copy",
    objects.rewrite: "objects.rewrite",
    objects.compose: "objects.compose",
    objects.restore: "objects.restore",
    objects.acl_list: "objectAccessControls.list",
    objects.batch: "batch",
}


def _get_bucket_policy(request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any) -> None:
    name = request.params.get("bucket_name")
    if name and name in storage.buckets:
        version = (request.query.get("optionsRequestedPolicyVersion") or [""])[0]
        try:
            storage_iam.readable_policy(storage, name, version)
        except storage_iam.Denied as denied:
            response.status = denied.status
            return response.json(denied.body)
    return buckets.get_iam_policy(request, response, storage, *args, **kwargs)


def _set_bucket_policy(request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any) -> None:
    name = request.params.get("bucket_name")
    if not name or name not in storage.buckets:
        response.status = HTTPStatus.NOT_FOUND
        return None
    body = request.data if isinstance(request.data, dict) else {}
    try:
        policy = storage_iam.set_iam_policy(_EMULATED[storage].access, storage, name, body)
    except storage_iam.Denied as denied:
        response.status = denied.status
        return response.json(denied.body)
    _EMULATED[storage].access.policy_replaced(storage.get_bucket_iam_policy(name), policy)
    storage.set_bucket_iam_policy(name, policy)
    response.json(policy)


def _test_bucket_permissions(
    request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any
) -> None:
    name = request.params.get("bucket_name")
    if not name or name not in storage.buckets:
        response.status = HTTPStatus.NOT_FOUND
        return None
    emulated = _EMULATED[storage]
    member = emulated.access.caller(request.get_header("Authorization"))
    asked = request.query.get("permissions") or []
    permissions = storage_iam.granted(emulated.access, storage, member, name, asked)
    response.json({"kind": "storage#testIamPermissionsResponse", "permissions": permissions})


_REPLACED: dict[Handler, Handler] = {
    buckets.insert: _insert_bucket,
    buckets.get_iam_policy: _get_bucket_policy,
    buckets.set_iam_policy: _set_bucket_policy,
    buckets.test_iam_permissions: _test_bucket_permissions,
}
_patch_lock = threading.Lock()


def _patch_routes() -> None:
    with _patch_lock:
        for _regex, handlers in gcs_server.HANDLERS:
            for http_method, handler in list(handlers.items()):
                if handler in _METHODS:
                    handlers[http_method] = _recorded(_REPLACED.get(handler, handler), _METHODS[handler])


def _recorded(handler: Handler, method: str) -> Handler:
    def recorded(request: Any, response: Any, storage: Storage, *args: Any, **kwargs: Any) -> None:
        emulated = _EMULATED.get(storage)
        if emulated is None:
            handler(request, response, storage, *args, **kwargs)
            return
        faults = emulated.faults
        refusal = faults.refusal()
        if refusal is not None:
            status = HTTP_STATUS[refusal]
            emulated.record.append("storage", method, _describe(request), outcome=status.name)
            return _error(response, status, "backendError", f"Injected fault on storage {method}.")
        try:
            storage_iam.check(emulated.access, storage, method, request)
        except storage_iam.Denied as denied:
            emulated.record.append("storage", method, _describe(request), outcome=denied.status.name)
            response.status = denied.status
            return response.json(denied.body)
        name = _new_object_name(request) if method == "objects.insert" else None
        if name is not None and (problem := _object_name_problem(name)):
            emulated.record.append("storage", method, _describe(request), outcome=HTTPStatus.BAD_REQUEST.name)
            return _error(response, HTTPStatus.BAD_REQUEST, "invalid", problem)
        if method in _PRECONDITION_METHODS and (status := _precondition_refusal(method, request, storage)):
            emulated.record.append("storage", method, _describe(request), outcome=status.name)
            if status == HTTPStatus.NOT_MODIFIED:
                response.status = status
                return None
            message = "At least one of the pre-conditions you specified did not hold."
            return _error(response, status, "conditionNotMet", message)
        # The storage server answers one request at a time; the lock keeps import_tree out meanwhile.
        with emulated.lock:
            try:
                handler(request, response, storage, *args, **kwargs)
            except Exception:
                outcome = "INTERNAL_SERVER_ERROR"
                raise
            else:
                outcome = "OK" if 200 <= response.status < 300 else response.status.name
                if outcome == "OK" and mutates(method) and faults.reply_lost():
                    outcome = "LOST"
                    _error(
                        response,
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        "backendError",
                        f"Injected lost reply on storage {method}.",
                    )
            finally:
                emulated.record.append("storage", method, _describe(request), outcome=outcome)

    return recorded


def _describe(request: Any) -> dict[str, Any]:
    described: dict[str, Any] = {"path": request.path, "query": request.query, "params": request.params}
    data = request.data
    content_type = request.get_header("Content-Type") or ""
    if content_type.startswith("multipart/related") and isinstance(data, dict):
        described["resource"] = data["meta"]
    elif (
        isinstance(data, dict)
        and content_type.startswith("application/json")
        and request.query.get("uploadType") != ["media"]
        and "upload_id" not in request.query
        and request.path.startswith(("/storage/", "/upload/storage/", "/b"))
    ):
        described["resource"] = data
    return described


# ---- files written straight into a bucket -----------------------------------------------------------


def _hashes(path: Path) -> tuple[str, str]:
    md5 = hashlib.md5()
    crc = google_crc32c.Checksum()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            md5.update(chunk)
            crc.update(chunk)
    return base64.b64encode(md5.digest()).decode(), base64.b64encode(crc.digest()).decode()


class CloudStorage:
    """services["storage"]: the package's server, hooked into this emulator's record.

    Creating it installs our route handlers (once per process) and ties `storage` (the package's
    Storage object) to `record` and `access`; `base_url` is the storage server's http://host:port.
    """

    def __init__(self, storage: Storage, record: Record, base_url: str, access: Access) -> None:
        self.storage = storage
        self.record = record
        self.base_url = base_url
        self.access = access
        access.add_policy_source(
            r"^projects/_/buckets/[^/]+", lambda name: storage_iam.bucket_policies(storage, name)
        )
        self.lock = threading.RLock()
        access.add_member_renamer(self._rename_member)
        # Replaced by the emulator's own when the server asks for this service's handler.
        self.faults = Faults()
        # (bucket, object) -> (size, mtime_ns) of the file when import_tree last matched it to its object.
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}
        _patch_routes()
        _EMULATED[storage] = self
        self._relink()

    def _rename_member(self, old: str, new: str) -> None:
        with self.lock:
            for bucket in list(self.storage.buckets):
                policy = self.storage.get_bucket_iam_policy(bucket)
                if rename_member(policy, old, new):
                    self.storage.set_bucket_iam_policy(bucket, policy)

    def _relink(self) -> None:
        """Point the media links that an earlier run stored at this server's address.

        The package writes each object's mediaLink with the address it was uploaded through, and the
        client downloads from that link: after a restart on another port, it would retry a dead port.
        """
        storage = self.storage
        resources = [obj for by_name in storage.objects.values() for obj in by_name.values()]
        # Soft-deleted objects: bucket -> name -> generation -> resource.
        resources += [
            obj
            for by_name in storage.soft_deleted.values()
            for generations in by_name.values()
            for obj in generations.values()
        ]
        stale = [
            obj
            for obj in resources
            if isinstance(obj.get("mediaLink"), str) and not obj["mediaLink"].startswith(self.base_url + "/")
        ]
        for obj in stale:
            obj["mediaLink"] = _ORIGIN.sub(lambda _: self.base_url, obj["mediaLink"], count=1)
        if stale:
            storage._write_config_to_file()

    def bucket_dir(self, bucket: str) -> Path:
        return Path(self.storage.get_storage_base()) / gcs_settings.STORAGE_DIR / bucket

    def import_tree(self, bucket: str) -> list[str]:
        """Make the files under the bucket's directory its objects, as GCS FUSE writes would have.

        New and changed files become objects with a new generation (size, md5Hash, crc32c,
        contentType from the extension, as gcsfuse sets it); objects whose file is gone are deleted;
        objects whose file is unchanged keep their metadata. Returns the names created, updated or
        deleted. Raises ApiError NOT_FOUND when the bucket does not exist.
        """
        storage = self.storage
        root = self.bucket_dir(bucket)
        with self.lock:
            if bucket not in storage.buckets:
                raise not_found(f"Bucket {bucket}")
            known = storage.objects.setdefault(bucket, {})
            changed: list[str] = []
            present: set[str] = set()
            # os.walk, not rglob: a directory a running task deletes mid-walk (an old checkpoint) is skipped.
            listed = (Path(folder) / name for folder, _, names in os.walk(root) for name in names)
            for path in sorted(listed):
                if not path.is_file():
                    continue
                name = path.relative_to(root).as_posix()
                try:
                    stat = path.stat()
                    signature = (stat.st_size, stat.st_mtime_ns)
                    current = known.get(name)
                    if current is not None and self._seen.get((bucket, name)) == signature:
                        present.add(name)
                        continue
                    md5, crc = _hashes(path)
                except FileNotFoundError:
                    # Deleted between the listing and the read by a task still writing to the mount (the
                    # trainer rotating its checkpoints): gone, as a later listing would find it.
                    continue
                present.add(name)
                self._seen[(bucket, name)] = signature
                if current is not None and (current.get("md5Hash"), current.get("crc32c")) == (md5, crc):
                    continue
                content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
                obj = objects._make_object_resource(
                    self.base_url, bucket, name, content_type, str(stat.st_size)
                )
                obj.update(md5Hash=md5, crc32c=crc, etag=md5)
                known[name] = obj
                changed.append(name)
            for name in sorted(set(known) - present):
                del known[name]
                self._seen.pop((bucket, name), None)
                changed.append(name)
            if changed:
                storage._write_config_to_file()
            return changed

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        self.faults = hub.faults
        # Storage is served over HTTP by the package; GCS's gRPC API (google.storage.v2) is not emulated.
        return grpc.method_handlers_generic_handler("google.storage.v2.Storage", {})
