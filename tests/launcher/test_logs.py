"""launcher/logs.py's Reader against the emulator's Logging and its read quota."""

from __future__ import annotations

from launcher import logs
from launcher.emulator.logging import ReadQuota

BUILD_LOG = "projects/demo-project/logs/cloudbuild"
FILTER = 'resource.type="build" AND resource.labels.build_id="b1"'


def test_a_long_log_read_under_a_tight_quota_comes_whole_each_line_once_in_order(local):
    logging = local.emulator.services["logging"]
    for n in range(2500):
        logging.append(BUILD_LOG, "build", {"build_id": "b1"}, f"line {n}")
    # Three pages of 1000 entries, each a ListLogEntries call; the quota lets one through per 0.25 s.
    quota = logging.read_quota = ReadQuota(1, window_s=0.25)
    notices: list[str] = []
    reader = logs.Reader(local.clients(), "demo-project", FILTER, notice=notices.append)

    assert [entry.text_payload for entry in reader.poll()] == [f"line {n}" for n in range(2500)]
    assert quota.refused >= 2  # the second and the third page each waited for the quota
    assert notices == [logs.QUOTA_NOTICE]  # said once, however often it waits
