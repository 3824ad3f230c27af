"""Logging v2: WriteLogEntries, ListLogEntries (filter, order, paging) and TailLogEntries (live stream).

Entries live in memory and in an append-only JSONL file beside state.json: a training job writes many
lines, and state.json is rewritten whole on every transaction. Every entry gets a server-assigned,
zero-padded insert id, so insert ids are unique and sort in arrival order (`insertId>"..."` resumes a
read exactly where a tail left off).

Filters are parsed, not matched as text: the subset of the Logging query language the launcher uses
(comparisons joined by AND) is accepted, and anything else is refused with INVALID_ARGUMENT naming the
part the emulator does not understand, so a launcher filter that would silently match nothing here is
caught.

ListLogEntries is held to Cloud Logging's read quota, per project and sliding window (`ReadQuota`).
"""

from __future__ import annotations

import base64
import operator
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
from google.cloud.logging_v2.types import log_entry
from google.cloud.logging_v2.types import logging as logging_types
from google.logging.type import log_severity_pb2
from google.protobuf import json_format

from launcher.emulator.access import error_info, project_number
from launcher.emulator.rpc import ApiError, Hub, Method, invalid, service_handler

_LogEntryPb = log_entry.LogEntry.pb()
_LOG_NAME = re.compile(r"^(?:projects|organizations|folders|billingAccounts)/[^/]+/logs/[^/]{1,511}$")
_PARENT = re.compile(r"^(?:projects|organizations|folders|billingAccounts)/[^/]+$")
_DEFAULT_PAGE_SIZE = 50
_MAX_PAGE_SIZE = 1000
_TAIL_SESSIONS_PER_PARENT = 10
_MAX_BUFFER_WINDOW_MS = 60_000
# https://cloud.google.com/logging/quotas, "Logging API quotas and limits": "Number of entries.list
# requests: 60 per minute, per Google Cloud project" (ListLogEntries is entries.list over gRPC).
READ_QUOTA = 60
READ_WINDOW_S = 60.0
# How often an idle tail wakes to notice that its client has gone away.
_TAIL_POLL_S = 0.1

_COMPARATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_SUPPORTED = (
    "the emulator supports comparisons joined by AND on resource.type, resource.labels.KEY, labels.KEY, "
    "logName (= and !=) and timestamp, insertId, severity (=, !=, <, <=, >, >=)"
)


def _unsupported(part: str) -> ApiError:
    return invalid(f"Unsupported filter expression {part!r}: {_SUPPORTED}.")


@dataclass(frozen=True)
class Comparison:
    """One `FIELD OP VALUE` of a filter; `path` is the field split at dots (quoted segments unquoted)."""

    path: tuple[str, ...]
    op: str
    value: str
    text: str


class _Scanner:
    _IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    _OPERATOR = re.compile(r">=|<=|!=|=~|!~|=|>|<|:")
    _BARE_VALUE = re.compile(r"[^\s()\"]+")
    _QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def rest(self) -> str:
        return self.text[self.pos :]

    def take(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        match = pattern.match(self.text, self.pos)
        if match:
            self.pos = match.end()
        return match

    def quoted(self) -> str | None:
        match = self.take(self._QUOTED)
        return re.sub(r"\\(.)", r"\1", match[1]) if match else None

    def keyword(self) -> str | None:
        """The upper-case keyword (AND, OR, NOT) at the cursor, without consuming it."""
        match = re.compile(r"(AND|OR|NOT)(?=[\s(\"]|$)").match(self.text, self.pos)
        return match[1] if match else None

    def segment(self) -> str | None:
        if self.rest().startswith('"'):
            return self.quoted()
        match = self.take(self._IDENTIFIER)
        return match[0] if match else None

    def comparison(self) -> Comparison:
        start = self.pos
        if self.rest()[:1] in ("(", "-") or self.keyword() in ("OR", "NOT"):
            raise _unsupported(self.rest())
        path = [self.segment()]
        while path[-1] is not None and self.rest().startswith("."):
            self.pos += 1
            path.append(self.segment())
        if None in path:
            raise _unsupported(self.text[start:].split()[0])
        self.skip_space()
        op = self.take(self._OPERATOR)
        if op is None:
            raise _unsupported(self.text[start:].strip())
        self.skip_space()
        value = self.quoted() if self.rest().startswith('"') else None
        if value is None:
            bare = self.take(self._BARE_VALUE)
            if bare is None:
                raise _unsupported(self.text[start:].strip())
            value = bare[0]
        text = self.text[start : self.pos]
        if op[0] not in _COMPARATORS:
            raise _unsupported(text)
        return Comparison(tuple(path), op[0], value, text)  # type: ignore[arg-type]


def parse_filter(text: str) -> list[Comparison]:
    """The comparisons of an AND-joined filter (juxtaposition is an implicit AND, as in Logging)."""
    scanner = _Scanner(text)
    comparisons: list[Comparison] = []
    scanner.skip_space()
    while not scanner.at_end():
        comparisons.append(scanner.comparison())
        scanner.skip_space()
        if scanner.keyword() == "AND":
            scanner.pos += 3
            scanner.skip_space()
            if scanner.at_end():
                raise invalid(f"Invalid filter {text!r}: AND at the end.")
    return comparisons


def parse_rfc3339(value: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp (nanosecond fractions kept)."""
    match = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})", value
    )
    if not match:
        raise invalid(f"Invalid timestamp {value!r}: expected RFC 3339, e.g. 2025-01-31T12:00:00.5Z.")
    zone = "+00:00" if match[3] in ("Z", "z") else match[3]
    seconds = datetime.fromisoformat(match[1].replace("t", "T").replace(" ", "T") + zone).timestamp()
    return int(seconds) * 1_000_000_000 + int((match[2] or "0").ljust(9, "0"))


def _severity(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return log_severity_pb2.LogSeverity.Value(value.upper())
    except ValueError:
        raise invalid(f"Invalid severity {value!r}.") from None


@dataclass(slots=True)
class _Stored:
    """An entry's indexed fields, plus the entry itself as wire bytes (compact, and ready to answer)."""

    seq: int
    log_name: str
    resource_type: str
    resource_labels: dict[str, str]
    labels: dict[str, str]
    severity: int
    timestamp_ns: int
    insert_id: str
    raw: bytes

    @classmethod
    def of(cls, seq: int, entry: Any) -> _Stored:
        return cls(
            seq=seq,
            log_name=entry.log_name,
            resource_type=entry.resource.type,
            resource_labels=dict(entry.resource.labels),
            labels=dict(entry.labels),
            severity=entry.severity,
            timestamp_ns=entry.timestamp.ToNanoseconds(),
            insert_id=entry.insert_id,
            raw=entry.SerializeToString(),
        )

    def key(self) -> tuple[int, int]:
        return (self.timestamp_ns, self.seq)


def _field(comparison: Comparison) -> tuple[Callable[[_Stored], Any], Any, bool]:
    """(getter, comparable value, ordered?) for the field a comparison names."""
    path, value = comparison.path, comparison.value
    if path == ("resource", "type"):
        return (lambda e: e.resource_type), value, False
    if len(path) == 3 and path[:2] == ("resource", "labels"):
        return (lambda e: e.resource_labels.get(path[2])), value, False
    if len(path) == 2 and path[0] == "labels":
        return (lambda e: e.labels.get(path[1])), value, False
    if path == ("logName",):
        return (lambda e: e.log_name), value, False
    if path == ("insertId",):
        return (lambda e: e.insert_id), value, True
    if path == ("timestamp",):
        return (lambda e: e.timestamp_ns), parse_rfc3339(value), True
    if path == ("severity",):
        return (lambda e: e.severity), _severity(value), True
    raise _unsupported(comparison.text)


def compile_filter(text: str) -> Callable[[_Stored], bool]:
    tests = []
    for comparison in parse_filter(text):
        getter, wanted, ordered = _field(comparison)
        if not ordered and comparison.op not in ("=", "!="):
            raise _unsupported(comparison.text)
        tests.append((getter, _COMPARATORS[comparison.op], wanted))

    def matches(entry: _Stored) -> bool:
        for getter, compare, wanted in tests:
            actual = getter(entry)
            if actual is None or not compare(actual, wanted):
                return False
        return True

    return matches


def _parents(resource_names: list[str]) -> tuple[str, ...]:
    if not resource_names:
        raise invalid("resource_names: at least one resource name is required, e.g. projects/PROJECT.")
    for name in resource_names:
        if not _PARENT.match(name):
            raise invalid(
                f"Invalid resource name {name!r}: expected projects/P, organizations/O, folders/F "
                "or billingAccounts/B."
            )
    return tuple(f"{name}/logs/" for name in resource_names)


def _encode_token(entry: _Stored) -> str:
    return base64.urlsafe_b64encode(f"{entry.timestamp_ns}:{entry.seq}".encode()).decode()


def _decode_token(token: str) -> tuple[int, int]:
    try:
        timestamp_ns, seq = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        return int(timestamp_ns), int(seq)
    except ValueError:
        raise invalid(f"Invalid page_token {token!r}.") from None


class ReadQuota:
    """ListLogEntries calls a project may make in any `window_s` seconds: Google's 60 a minute by default;
    tests shrink the window (`emulator start --log-read-quota/--log-read-window`)."""

    def __init__(self, limit: int = READ_QUOTA, window_s: float = READ_WINDOW_S) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("the read quota needs a limit of at least 1 and a window over 0 seconds")
        self.limit = limit
        self.window_s = window_s
        self.refused = 0  # calls refused so far: what a test of a reader that outruns the quota reads
        self._lock = threading.Lock()
        self._reads: dict[str, deque[float]] = {}

    def take(self, resource: str) -> None:
        """Count one read by `resource`'s project, or refuse it as Google does when the window is full.

        Refused calls are not counted, as with Google's quotas, so a caller that backs off gets through.
        The message and the ErrorInfo are those of the real refusal, as field reports quote it (e.g.
        https://github.com/snarfed/bridgy-fed/issues/620): reason RATE_LIMIT_EXCEEDED, quota_limit
        ReadRequestsPerMinutePerProject, quota_metric logging.googleapis.com/read_requests.
        """
        project = resource.split("/", 1)[1]
        now = time.monotonic()
        with self._lock:
            reads = self._reads.setdefault(project, deque())
            while reads and reads[0] <= now - self.window_s:
                reads.popleft()
            if len(reads) < self.limit:
                reads.append(now)
                return
            self.refused += 1
        number = project_number(project)
        raise ApiError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute' of "
            f"service 'logging.googleapis.com' for consumer 'project_number:{number}'.",
            [
                error_info(
                    "RATE_LIMIT_EXCEEDED",
                    "googleapis.com",
                    consumer=f"projects/{number}",
                    quota_limit="ReadRequestsPerMinutePerProject",
                    quota_limit_value=str(self.limit),
                    quota_metric="logging.googleapis.com/read_requests",
                    service="logging.googleapis.com",
                )
            ],
        )


class Logging:
    def __init__(self, data_dir: Path, read_quota: ReadQuota | None = None) -> None:
        self._path = data_dir / "logging.jsonl"
        self.read_quota = read_quota or ReadQuota()
        self._changed = threading.Condition()
        self._entries: list[_Stored] = self._load()
        self._file = self._path.open("a", encoding="utf-8")
        self._stopping = False
        self._tails: dict[str, int] = {}

    def _load(self) -> list[_Stored]:
        if not self._path.exists():
            return []
        data = self._path.read_bytes()
        # A killed emulator can leave a torn last line; drop it so the next append starts a fresh line.
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with self._path.open("r+b") as file:
                file.truncate(len(complete))
        entries = []
        for line in complete.decode().splitlines():
            entry = _LogEntryPb()
            json_format.Parse(line, entry, ignore_unknown_fields=True)
            entries.append(_Stored.of(len(entries), entry))
        return entries

    @property
    def tail_sessions(self) -> int:
        """Live TailLogEntries streams (what a test waits for before appending)."""
        with self._changed:
            return sum(self._tails.values())

    def append(
        self,
        log_name: str,
        resource_type: str,
        resource_labels: dict[str, str],
        text: str,
        *,
        labels: dict[str, str] | None = None,
        severity: str = "DEFAULT",
    ) -> None:
        """Write one text entry, as another emulated service (Cloud Run, Cloud Build) would."""
        if not _LOG_NAME.match(log_name):
            raise ValueError(f"invalid log name {log_name!r}")
        entry = _LogEntryPb(
            log_name=log_name,
            text_payload=text,
            labels=labels or {},
            severity=log_severity_pb2.LogSeverity.Value(severity),
        )
        entry.resource.type = resource_type
        entry.resource.labels.update(resource_labels)
        self._ingest([entry])

    def _ingest(self, entries: list[Any]) -> None:
        with self._changed:
            if self._stopping:
                return
            for entry in entries:
                seq = len(self._entries)
                entry.insert_id = f"{seq:020d}"
                now = time.time_ns()
                entry.receive_timestamp.FromNanoseconds(now)
                if not entry.HasField("timestamp"):
                    entry.timestamp.FromNanoseconds(now)
                self._file.write(json_format.MessageToJson(entry, indent=None) + "\n")
                self._entries.append(_Stored.of(seq, entry))
            self._file.flush()
            self._changed.notify_all()

    def shutdown(self) -> None:
        with self._changed:
            self._stopping = True
            self._file.close()
            self._changed.notify_all()

    def write(self, request: logging_types.WriteLogEntriesRequest, context: grpc.ServicerContext):
        wire = logging_types.WriteLogEntriesRequest.pb(request)
        if not wire.entries:
            raise invalid("entries: at least one log entry is required.")
        prepared = []
        for index, given in enumerate(wire.entries):
            entry = _LogEntryPb()
            entry.CopyFrom(given)
            entry.log_name = entry.log_name or wire.log_name
            if not _LOG_NAME.match(entry.log_name):
                raise invalid(
                    f"entries[{index}].log_name: {entry.log_name!r} is not a log name "
                    "(projects/PROJECT/logs/LOG_ID, LOG_ID URL-encoded)."
                )
            if not entry.HasField("resource"):
                entry.resource.CopyFrom(wire.resource)
            if not entry.resource.type:
                raise invalid(f"entries[{index}].resource: a monitored resource type is required.")
            for key, value in wire.labels.items():
                if key not in entry.labels:
                    entry.labels[key] = value
            prepared.append(entry)
        if not wire.dry_run:
            self._ingest(prepared)
        return logging_types.WriteLogEntriesResponse()

    def list(self, request: logging_types.ListLogEntriesRequest, context: grpc.ServicerContext):
        parents = _parents(list(request.resource_names))
        # The caller's project pays for the read; the emulator's callers read their own project.
        self.read_quota.take(request.resource_names[0])
        matches = compile_filter(request.filter)
        order = " ".join(request.order_by.split()).lower()
        if order not in ("", "timestamp asc", "timestamp desc"):
            raise invalid(f"Invalid order_by {request.order_by!r}: use 'timestamp asc' or 'timestamp desc'.")
        descending = order == "timestamp desc"
        if not 0 <= request.page_size <= _MAX_PAGE_SIZE:
            raise invalid(f"page_size must be between 0 and {_MAX_PAGE_SIZE}.")
        page_size = request.page_size or _DEFAULT_PAGE_SIZE
        after = _decode_token(request.page_token) if request.page_token else None
        with self._changed:
            snapshot = list(self._entries)
        selected = [e for e in snapshot if e.log_name.startswith(parents) and matches(e)]
        selected.sort(key=_Stored.key, reverse=descending)
        if after is not None:
            selected = [e for e in selected if (e.key() < after if descending else e.key() > after)]
        page = selected[:page_size]
        wire = logging_types.ListLogEntriesResponse.pb()()
        for entry in page:
            wire.entries.add().ParseFromString(entry.raw)
        if len(selected) > page_size:
            wire.next_page_token = _encode_token(page[-1])
        return logging_types.ListLogEntriesResponse.wrap(wire)

    def tail(
        self,
        request: logging_types.TailLogEntriesRequest,
        requests: Iterator[logging_types.TailLogEntriesRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[logging_types.TailLogEntriesResponse]:
        parents = _parents(list(request.resource_names))
        matches = compile_filter(request.filter)
        # logging.proto, TailLogEntriesRequest.buffer_window: "Valid values are between 0-60000 milliseconds."
        window = logging_types.TailLogEntriesRequest.pb(request).buffer_window.ToMilliseconds()
        if not 0 <= window <= _MAX_BUFFER_WINDOW_MS:
            raise invalid(f"buffer_window must be between 0 and {_MAX_BUFFER_WINDOW_MS} milliseconds.")
        with self._changed:
            busy = [p for p in parents if self._tails.get(p, 0) >= _TAIL_SESSIONS_PER_PARENT]
            if busy:
                raise ApiError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"Quota exceeded: at most {_TAIL_SESSIONS_PER_PARENT} live tail sessions "
                    f"per resource ({busy[0].removesuffix('/logs/')}).",
                )
            for parent in parents:
                self._tails[parent] = self._tails.get(parent, 0) + 1
            cursor = len(self._entries)
        try:
            while context.is_active():
                with self._changed:
                    if not self._stopping and cursor == len(self._entries):
                        self._changed.wait(_TAIL_POLL_S)
                    if self._stopping:
                        return
                    fresh = self._entries[cursor:]
                    cursor += len(fresh)
                wire = logging_types.TailLogEntriesResponse.pb()()
                for entry in fresh:
                    if entry.log_name.startswith(parents) and matches(entry):
                        wire.entries.add().ParseFromString(entry.raw)
                if wire.entries:
                    yield logging_types.TailLogEntriesResponse.wrap(wire)
        finally:
            with self._changed:
                for parent in parents:
                    self._tails[parent] -= 1

    def handler(self, hub: Hub) -> grpc.GenericRpcHandler:
        return service_handler(
            "google.logging.v2.LoggingServiceV2",
            [
                Method(
                    "WriteLogEntries",
                    self.write,
                    logging_types.WriteLogEntriesRequest,
                    logging_types.WriteLogEntriesResponse,
                ),
                Method(
                    "ListLogEntries",
                    self.list,
                    logging_types.ListLogEntriesRequest,
                    logging_types.ListLogEntriesResponse,
                ),
                Method(
                    "TailLogEntries",
                    self.tail,
                    logging_types.TailLogEntriesRequest,
                    logging_types.TailLogEntriesResponse,
                    kind="stream_stream",
                ),
            ],
            hub,
        )
