"""The report page of the tiny model's real run (the session's trained_run), as a person sees it: rendered by
`gemma-launch report` from the bucket the trainer uploaded to, opened in headless Chromium (Debian's
`chromium`, which .ci/run installs) with every network request refused."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher import report as run_report
from launcher.cloud import Clients
from launcher.settings_sources import load_settings
from trainer import report_page
from trainer.run_record import PHASES

# Every test reads the session's full training run of the tiny model.
pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
# README.md's picture of the page: `make screenshot` refreshes it; a plain run leaves the tracked file alone.
SCREENSHOT_ENV = "GEMMA_LAUNCH_SCREENSHOT"
SHOT = {"x": 0, "y": 0, "width": 1280, "height": 2200}
SECTIONS = ("run", "metrics", "breeds", "confusion", "curve", "gallery")


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # As root (CI) Chromium refuses to start with its sandbox.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Visit:
    """A page opened from a file, with what it logged and every request it tried to make."""

    def __init__(self, browser, path: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.requests: list[str] = []
        self.errors: list[str] = []

        def refuse(route) -> None:  # nothing but the file itself may load
            if route.request.url != path.as_uri():
                self.requests.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        self.context.route("**/*", refuse)
        self.page = self.context.new_page()
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(path.as_uri())


@pytest.fixture(scope="module")
def launcher_page(trained_run, storage_emulator, tmp_path_factory) -> Path:
    """`gemma-launch report`'s page of the run, read from the bucket the trainer uploaded its outputs to."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.host)
        settings = load_settings(flags={"project_id": "demo-project", "bucket": trained_run.bucket})
        return run_report.write(
            Clients("demo-project"), settings, [trained_run.execution], tmp_path_factory.mktemp("report")
        )


def test_the_launchers_page_is_the_trainers_report_html_and_small(trained_run, launcher_page) -> None:
    assert launcher_page.read_text() == (trained_run.run_dir / "report.html").read_text()
    assert launcher_page.stat().st_size < 3_000_000  # embedded thumbnails are downsized
    predictions = json.loads((trained_run.run_dir / "predictions.json").read_text())
    first = predictions["images"][0]
    assert first["path"].startswith("images/") and len(first["final"]["top5"]) == 5
    for image in predictions["images"]:  # class scoring: the prediction is the most likely breed
        for stage in ("baseline", "final"):
            assert image[stage]["top5"][0][0] == image[stage]["predicted"]
    results = json.loads((trained_run.run_dir / "results.json").read_text())
    assert tuple(results["phases"]) == PHASES
    assert all(value >= 0 for value in results["phases"].values()) and results["phases"]["train_s"] > 0


def test_the_page_shows_every_section_offline_with_the_runs_numbers(
    trained_run, launcher_page, browser, tmp_path
) -> None:
    visit = Visit(browser, launcher_page)
    page = visit.page
    results = json.loads((trained_run.run_dir / "results.json").read_text())
    for section in SECTIONS:
        assert page.locator(f"#run-1-{section}").is_visible(), section
    # The top of the page, for README.md: the run, the metrics, the per-breed table, the heat map's start.
    screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "report.png")
    page.screenshot(path=str(screenshot), full_page=True, clip=SHOT)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    for key, label in report_page.METRICS:
        row = page.locator(f'tr[data-metric="{label}"]')
        assert row.locator("td.baseline").inner_text() == f"{results['baseline'][key]:.1%}"
        assert row.locator("td.final").inner_text() == f"{results['final'][key]:.1%}"
    shown = {
        cells[0]: cells[1:5]
        for cells in (row.split("\t") for row in page.locator("table.per-breed tbody tr").all_inner_texts())
    }
    assert shown == {
        row["name"]: [
            f"{row['f1']:.3f}",
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            str(row["support"]),
        ]
        for row in results["per_class"]
    }
    curve = page.locator("#run-1-curve polyline")
    assert curve.count() == 3  # loss, learning rate and gradient norm
    assert page.locator("#run-1-gallery .card img").count() == len(
        report_page.gallery_indices(
            json.loads((trained_run.run_dir / "predictions.json").read_text())["images"]
        )
    )
    assert visit.errors == [] and visit.requests == []
    visit.context.close()


def test_the_per_breed_table_sorts_when_its_header_is_clicked(launcher_page, browser) -> None:
    visit = Visit(browser, launcher_page)
    page = visit.page

    def column(index: int) -> list[str]:
        return [row.split("\t")[index] for row in page.locator("table.per-breed tbody tr").all_inner_texts()]

    f1 = [float(value) for value in column(1)]
    assert f1 == sorted(f1)  # worst first
    page.locator("table.per-breed th", has_text="F1").first.click()
    assert [float(value) for value in column(1)] == sorted(f1, reverse=True)
    page.locator("table.per-breed th", has_text="breed").first.click()
    assert column(0) == sorted(column(0))
    assert visit.errors == []
    visit.context.close()


def test_several_runs_get_a_leaderboard_and_a_side_by_side(trained_run, browser, tmp_path) -> None:
    files = [
        json.loads((trained_run.run_dir / name).read_text())
        for name in ("results.json", "predictions.json", "training_curve.json", "thumbnails.json")
    ]
    worse = {**files[0], "final": {**files[0]["final"], "accuracy": 0.01}}
    pages = [
        report_page.run_page(*files, name="run-a"),
        report_page.run_page(worse, *files[1:], name="run-b"),
    ]
    path = tmp_path / "both.html"
    path.write_text(report_page.render(pages))
    visit = Visit(browser, path)
    page = visit.page
    assert page.locator("#leaderboard").is_visible() and page.locator("#side-by-side").is_visible()
    assert [row.split("\t")[0] for row in page.locator("#leaderboard tbody tr").all_inner_texts()] == [
        "run-a",
        "run-b",
    ]
    for section in SECTIONS:
        assert page.locator(f"#run-2-{section}").is_visible(), section
    assert visit.errors == [] and visit.requests == []
    visit.context.close()
