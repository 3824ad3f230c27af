"""Where `results` points a person for an execution's report.html."""

from __future__ import annotations

from launcher import report as run_report
from launcher.cloud import EMULATOR_ENV
from launcher.settings_sources import load_settings

EXECUTION = "projects/demo-project/locations/europe-west4/jobs/gemma3-finetuning-job/executions/job-abc12"


def test_the_report_link_is_the_authenticated_console_url(monkeypatch):
    settings = load_settings(flags={"project_id": "demo-project"})
    assert run_report.link(settings, EXECUTION, {}) == (
        "https://storage.cloud.google.com/demo-project-gemma3-finetuning/runs/job-abc12/report.html"
    )


def test_on_the_emulator_the_report_link_is_the_file_its_task_wrote(monkeypatch, tmp_path):
    monkeypatch.setenv(EMULATOR_ENV, "localhost:1")
    settings = load_settings(flags={"project_id": "demo-project"})
    # An emulated task's --output-dir: the bucket's directory in the emulator's data dir, mounted.
    results = {"settings": {"flags": {"output-dir": f"{tmp_path}/storage/bucket/runs"}}}
    assert (
        run_report.link(settings, EXECUTION, results)
        == f"{tmp_path}/storage/bucket/runs/job-abc12/report.html"
    )
