"""The whole flow against a real Google Cloud project, for maintainers: `make cloud-test`.

Skipped unless GEMMA_LAUNCH_TEST_PROJECT names a project and Application Default Credentials are
present (`gcloud auth application-default login`). It has never run against Google Cloud where it was
written (none there): only once against the local emulator, by pointing the same commands at it, so
its first real run may need fixes. It costs money: a Cloud Build of the real image
(the longest step, tens of minutes the first time) and a short CPU-only Cloud Run job, no GPU quota.

In order: doctor (reported, not asserted: a project may start with its APIs off), up with a tiny
Gemma 3 and a synthetic pet set staged from this machine, doctor again (every check passes), run
--follow with --gpu none, results, and a second up that changes nothing. It uses its own names
(service accounts, bucket <project>-gemma-launch-test, repository, secret and job gemma-launch-test*)
so it never touches a real deployment, and leaves them in place: a second run reuses them. The
secret holds a stand-in token, since local sources need none. GEMMA_LAUNCH_TEST_REGION picks the
region (default: gemma-launch's).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import google.auth
import google.auth.exceptions
import pytest
from click.testing import CliRunner

from launcher.cli import main

PROJECT = os.environ.get("GEMMA_LAUNCH_TEST_PROJECT", "")
REGION = os.environ.get("GEMMA_LAUNCH_TEST_REGION", "")
REPO = Path(__file__).resolve().parents[2]


def _why_skip() -> str | None:
    if not PROJECT:
        return "GEMMA_LAUNCH_TEST_PROJECT is not set"
    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return "no Application Default Credentials (gcloud auth application-default login)"
    return None


_SKIP = _why_skip()
pytestmark = [pytest.mark.cloud, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

REGION_LINE = f'region = "{REGION}"' if REGION else ""
SETTINGS = f"""
project_id = "{PROJECT}"
{REGION_LINE}
gpu = "none"
service_account = "gemma-launch-test"
build_service_account = "gemma-launch-test-build"
bucket = "{PROJECT}-gemma-launch-test"
repository = "gemma-launch-test"
secret_id = "GEMMA_LAUNCH_TEST_HF_TOKEN"
job = "gemma-launch-test"
task_timeout = "30m"
max_retries = 0

[trainer]
train-size = 64
eval-size = 32
num-epochs = 1
eval-method = "score"
seed = 0
"""


def cli(*args: str):
    result = CliRunner().invoke(main, list(args))
    print(f"$ gemma-launch {' '.join(args)}\n{result.output}")
    return result


@pytest.mark.timeout(90 * 60)
def test_doctor_up_run_results_and_a_second_up_on_a_real_project(tmp_path, monkeypatch):
    Path("gemma-launch.toml").write_text(SETTINGS)  # the working directory is the test's own
    monkeypatch.setenv("HF_TOKEN", "hf_gemma_launch_cloud_test_stand_in")
    model, dataset = tmp_path / "tiny-gemma3", tmp_path / "oxford-iiit-pet"
    for module, out, *extra in [
        ("trainer.offline.tiny", model),
        ("trainer.offline.synthetic", dataset, "--per-class", "2", "--test-per-class", "1"),
    ]:
        subprocess.run([sys.executable, "-m", module, str(out), *extra], cwd=REPO, check=True)
    sources = ["--model-source", str(model), "--dataset-source", str(dataset)]

    before = cli("doctor")
    assert before.exit_code in (0, 2) and "Traceback" not in before.output

    up = cli("up", *sources)
    assert up.exit_code == 0, up.output
    assert "Ready. Start a fine-tuning run" in up.output or "Everything was already in place" in up.output

    after = cli("doctor")
    assert after.exit_code == 0, after.output

    run = cli("run", "--follow")
    assert run.exit_code == 0, run.output
    assert "succeeded: 1/1 tasks succeeded" in run.output

    results = cli("results")
    assert results.exit_code == 0, results.output
    assert "fine-tuned" in results.output

    again = cli("up", *sources)
    assert again.exit_code == 0, again.output
    assert "Everything was already in place: nothing changed." in again.output
