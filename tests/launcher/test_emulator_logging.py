import threading
import time
from collections.abc import Callable

import pytest
from google.api_core import exceptions
from google.cloud.logging_v2.types import LogEntry, TailLogEntriesRequest

from launcher.cloud import Clients
from launcher.emulator.logging import ReadQuota
from launcher.emulator.server import Emulator

PROJECT = "projects/demo-project"
STDOUT = f"{PROJECT}/logs/run.googleapis.com%2Fstdout"
STDERR = f"{PROJECT}/logs/run.googleapis.com%2Fstderr"
BUILD_LOG = f"{PROJECT}/logs/cloudbuild"
EXECUTION = "run.googleapis.com/execution_name"
TASK = "run.googleapis.com/task_index"


def run_job(job: str) -> dict:
    return {"type": "cloud_run_job", "labels": {"job_name": job, "location": "europe-west4"}}


def entry(text: str, second: int, **fields) -> LogEntry:
    return LogEntry(text_payload=text, timestamp={"seconds": 1_735_689_600 + second}, **fields)


def write_sample(clients: Clients) -> None:
    """Five entries whose timestamps are 2025-01-01T00:00:0Ns, N given, written out of time order."""
    clients.logging.write_log_entries(
        log_name=STDOUT,
        resource=run_job("train"),
        labels={EXECUTION: "train-abc", TASK: "0"},
        entries=[
            entry("A", 1, severity="INFO"),
            entry("B", 2, log_name=STDERR, severity="ERROR", labels={TASK: "1"}),
            entry("C", 3, severity="WARNING", labels={EXECUTION: "train-def"}),
            entry("E", 0, resource=run_job("other"), severity="CRITICAL", labels={EXECUTION: "other-1"}),
        ],
    )
    clients.logging.write_log_entries(
        entries=[entry("D", 4, log_name=BUILD_LOG, resource={"type": "build", "labels": {"build_id": "b1"}})]
    )


def texts(entries) -> list[str]:
    return [e.text_payload for e in entries]


def list_texts(clients: Clients, filter_: str = "", order_by: str = "") -> list[str]:
    return texts(
        clients.logging.list_log_entries(
            request={"resource_names": [PROJECT], "filter": filter_, "order_by": order_by}
        )
    )


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_written_entries_get_defaults_increasing_insert_ids_and_receive_times(local):
    clients = local.clients()
    write_sample(clients)
    listed = list(clients.logging.list_log_entries(resource_names=[PROJECT]))
    assert texts(listed) == ["E", "A", "B", "C", "D"]
    by_text = {e.text_payload: e for e in listed}
    assert by_text["A"].log_name == STDOUT and by_text["B"].log_name == STDERR
    assert dict(by_text["B"].labels) == {EXECUTION: "train-abc", TASK: "1"}
    assert by_text["E"].resource.labels["job_name"] == "other"
    insert_ids = [by_text[t].insert_id for t in "ABCED"]
    assert insert_ids == sorted(insert_ids) and len(set(insert_ids)) == 5
    assert all(e.receive_timestamp.year >= 2025 for e in listed)


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ('resource.type="cloud_run_job"', ["E", "A", "B", "C"]),
        ('resource.type="cloud_run_job" AND resource.labels.job_name="train"', ["A", "B", "C"]),
        (f'labels."{EXECUTION}"="train-abc"', ["A", "B"]),
        (f'labels."{EXECUTION}"="train-abc" AND labels."{TASK}"="1"', ["B"]),
        (f'logName="{STDERR}"', ["B"]),
        ('timestamp>="2025-01-01T00:00:02Z"', ["B", "C", "D"]),
        ('timestamp>"2025-01-01T00:00:02Z"', ["C", "D"]),
        ("timestamp>2025-01-01T00:00:02.5+00:00", ["C", "D"]),
        ("severity>=ERROR", ["E", "B"]),
        ('resource.labels.build_id="b1"', ["D"]),
        ('resource.type="build"\nresource.labels.build_id="b1"', ["D"]),
        ('resource.labels.job_name!="train"', ["E"]),
    ],
)
def test_list_filters(local, filter_, expected):
    clients = local.clients()
    write_sample(clients)
    assert list_texts(clients, filter_) == expected


def test_insert_id_filter_resumes_after_an_entry(local):
    clients = local.clients()
    write_sample(clients)
    # Written in the order A B C E D: what came after C is E and D, whatever their timestamps.
    c = list(clients.logging.list_log_entries(resource_names=[PROJECT]))[3]
    assert c.text_payload == "C"
    assert list_texts(clients, f'insertId>"{c.insert_id}"') == ["E", "D"]


@pytest.mark.parametrize(
    ("filter_", "named"),
    [
        ('resource.type="cloud_run_job" OR severity>=ERROR', "OR severity>=ERROR"),
        ('textPayload:"loss"', 'textPayload:"loss"'),
        ('jsonPayload.step="3"', 'jsonPayload.step="3"'),
        ('NOT resource.type="build"', 'NOT resource.type="build"'),
        ('(resource.type="build")', '(resource.type="build")'),
        ('resource.type>"build"', 'resource.type>"build"'),
    ],
)
def test_unsupported_filters_are_refused_naming_the_part(local, filter_, named):
    with pytest.raises(exceptions.InvalidArgument) as raised:
        list_texts(local.clients(), filter_)
    assert named in raised.value.message


def test_list_validates_like_the_service(local):
    logging = local.clients().logging
    with pytest.raises(exceptions.InvalidArgument):
        list(logging.list_log_entries(resource_names=[]))
    with pytest.raises(exceptions.InvalidArgument):
        list(logging.list_log_entries(request={"resource_names": [PROJECT], "order_by": "severity"}))
    with pytest.raises(exceptions.InvalidArgument):
        list(logging.list_log_entries(request={"resource_names": [PROJECT], "filter": "timestamp>today"}))
    with pytest.raises(exceptions.InvalidArgument):
        logging.write_log_entries(entries=[LogEntry(text_payload="no log name", resource={"type": "global"})])


def test_order_and_paging(local):
    clients = local.clients()
    write_sample(clients)
    assert list_texts(clients, order_by="timestamp desc") == ["D", "C", "B", "A", "E"]
    pager = clients.logging.list_log_entries(
        request={"resource_names": [PROJECT], "order_by": "timestamp desc", "page_size": 2}
    )
    pages = [texts(page.entries) for page in pager.pages]
    assert pages == [["D", "C"], ["B", "A"], ["E"]]
    asc = clients.logging.list_log_entries(request={"resource_names": [PROJECT], "page_size": 3})
    assert [texts(page.entries) for page in asc.pages] == [["E", "A", "B"], ["C", "D"]]


def test_list_is_held_to_googles_read_quota_of_60_a_minute_per_project(local):
    logging = local.clients().logging
    for _ in range(60):
        list(logging.list_log_entries(resource_names=[PROJECT]))
    with pytest.raises(exceptions.ResourceExhausted) as refused:
        list(logging.list_log_entries(resource_names=[PROJECT]))
    assert refused.value.code == 429  # what google-api-core, and so cloud.RETRY, sees
    assert refused.value.message.startswith(
        "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute' of service "
        "'logging.googleapis.com' for consumer 'project_number:"
    )
    assert refused.value.reason == "RATE_LIMIT_EXCEEDED"
    assert refused.value.metadata["quota_limit"] == "ReadRequestsPerMinutePerProject"
    assert refused.value.metadata["quota_limit_value"] == "60"
    # Each project has its own quota.
    assert list(logging.list_log_entries(resource_names=["projects/other-project"])) == []


def test_a_refused_read_is_not_counted_and_reads_resume_once_the_window_moves_on(local):
    quota = local.emulator.services["logging"].read_quota = ReadQuota(2, window_s=0.5)
    logging = local.clients().logging
    write_sample(local.clients())
    for _ in range(2):
        assert len(list(logging.list_log_entries(resource_names=[PROJECT]))) == 5
    for _ in range(3):
        with pytest.raises(exceptions.ResourceExhausted):
            list(logging.list_log_entries(resource_names=[PROJECT]))
    assert quota.refused == 3
    time.sleep(0.5)
    assert len(list(logging.list_log_entries(resource_names=[PROJECT]))) == 5


def test_tail_streams_entries_appended_after_it_started_until_cancelled(local):
    service = local.emulator.services["logging"]
    service.append(STDOUT, "cloud_run_job", {"job_name": "train"}, "before the tail")

    def produce() -> None:
        wait_until(lambda: service.tail_sessions == 1)
        service.append(STDOUT, "cloud_run_job", {"job_name": "train"}, "line 0", labels={EXECUTION: "e"})
        service.append(STDOUT, "cloud_run_job", {"job_name": "other"}, "not this job")
        service.append(STDERR, "cloud_run_job", {"job_name": "train"}, "line 1", severity="ERROR")
        service.append(STDOUT, "cloud_run_job", {"job_name": "train"}, "line 2")

    producer = threading.Thread(target=produce)
    producer.start()
    request = TailLogEntriesRequest(
        resource_names=[PROJECT],
        filter='resource.type="cloud_run_job" AND resource.labels.job_name="train"',
        buffer_window={"seconds": 2},
    )
    stream = local.clients().logging.tail_log_entries(requests=iter([request]))
    received: list[LogEntry] = []
    for response in stream:
        received += response.entries
        if len(received) >= 3:
            break
    stream.cancel()
    producer.join()
    assert texts(received) == ["line 0", "line 1", "line 2"]
    assert received[1].severity == 500 and received[0].labels[EXECUTION] == "e"
    with pytest.raises(exceptions.Cancelled):
        next(stream)
    wait_until(lambda: service.tail_sessions == 0)


def test_tail_refuses_a_bad_filter(local):
    request = TailLogEntriesRequest(resource_names=[PROJECT], filter="labels.x:y")
    with pytest.raises(exceptions.InvalidArgument):
        next(iter(local.clients().logging.tail_log_entries(requests=iter([request]))))


@pytest.mark.parametrize("seconds", [-1, 61])
def test_tail_refuses_a_buffer_window_outside_0_to_60_seconds(local, seconds):
    # logging.proto, TailLogEntriesRequest.buffer_window: "Valid values are between 0-60000 milliseconds."
    request = TailLogEntriesRequest(resource_names=[PROJECT], buffer_window={"seconds": seconds})
    with pytest.raises(exceptions.InvalidArgument, match="buffer_window"):
        next(iter(local.clients().logging.tail_log_entries(requests=iter([request]))))


def test_entries_survive_a_restart_and_insert_ids_keep_increasing(tmp_path, monkeypatch):
    data_dir = tmp_path / "emulator"
    with Emulator(data_dir=data_dir) as first:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", first.host)
        write_sample(Clients("demo-project"))
    with Emulator(data_dir=data_dir) as second:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", second.host)
        second.services["logging"].append(BUILD_LOG, "build", {"build_id": "b2"}, "F")
        listed = list(Clients("demo-project").logging.list_log_entries(resource_names=[PROJECT]))
    assert texts(listed) == ["E", "A", "B", "C", "D", "F"]
    assert max(e.insert_id for e in listed) == listed[-1].insert_id
    assert len({e.insert_id for e in listed}) == 6
