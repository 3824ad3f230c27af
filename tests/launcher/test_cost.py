"""Cost estimates: prices read over the wire from the emulated Cloud Billing Catalog, the duration model,
and the built-in table when the catalog lists nothing for the job."""

from __future__ import annotations

import pytest

from launcher import cost, pricing
from launcher import job as jobs
from launcher.settings_sources import load_settings

MODEL = "/mnt/gcs/google/gemma-3-27b-it"
ARGS = ["--model-id", MODEL, "--train-size", "1000", "--eval-size", "200", "--num-epochs", "2"]


@pytest.fixture
def job(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "demo-project")
    settings = load_settings(None, {})
    assert (settings.gpu, settings.cpu, settings.memory) == ("nvidia-rtx-pro-6000", "20", "80Gi")
    return jobs.job_spec(settings, "europe-west4-docker.pkg.dev/p/r/i@sha256:0", ARGS)


def test_the_estimate_is_the_catalogs_price_times_the_expected_duration(local, job):
    prices = pricing.prices(local.clients(), "europe-west4", "nvidia-rtx-pro-6000")
    assert prices.source == "Cloud Billing Catalog API"
    found = cost.estimate(job, ARGS, prices, cost.built_in_rates("nvidia-rtx-pro-6000", MODEL))
    # By hand: 20 vCPU x $0.000018 + 80 GiB x $0.000002 + 1 GPU x $0.0005 = $0.00102 a second, for
    # 900 s (load, save) + 1000 x 2 / (9.42 x 0.5) s of training + 2 x 200 / (10.4 x 0.5) s of evaluation.
    seconds = 900 + 2000 / 4.71 + 400 / 5.2
    assert found.seconds == pytest.approx(seconds)
    assert found.usd == pytest.approx(seconds * 0.00102)
    assert found.describe().startswith(f"≈ ${seconds * 0.00102:.2f} (about 0h23m; first run of this model")
    assert "±50%" in found.describe() and "prices: Cloud Billing Catalog API" in found.describe()


def test_a_sweeps_estimate_is_the_sum_of_its_tasks_each_with_its_own_sizes(local, job, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "demo-project")
    combinations = [{"train-size": "500"}, {"train-size": "1000", "num-epochs": "3"}]
    found = cost.for_sweep(local.clients(), load_settings(None, {}), job, ARGS, combinations)
    # By hand, as above: each task's 900 s + its training + the same two evaluations.
    first, second = (900 + 500 * 2 / 4.71 + 400 / 5.2), (900 + 1000 * 3 / 4.71 + 400 / 5.2)
    assert found.usd == pytest.approx((first + second) * 0.00102)
    assert (found.tasks, found.seconds) == (2, pytest.approx((first + second) / 2))
    assert " x 2 tasks" in found.describe()


def test_a_finished_runs_measured_rates_replace_the_table(job):
    measured = {
        "eval_size": 200,
        "train": {"steps": 100, "runtime_s": 400.0, "samples_per_s": 5.0},
        "phases": {
            "load_s": 100.0,
            "image_features_s": 20.0,
            "baseline_s": 40.0,
            "memory_plan_s": 5.0,
            "train_s": 400.0,
            "final_eval_s": 40.0,
            "save_s": 25.0,
        },
    }
    rates = cost._from_results(measured, cost.built_in_rates("nvidia-rtx-pro-6000", MODEL))
    # 150 s fixed + 2000 / 5 s of training + 400 / (400 / 80) s of evaluation.
    assert cost.duration_s(rates, ARGS) == pytest.approx(150 + 400 + 80)


def test_without_the_jobs_skus_in_the_catalog_the_dated_table_is_used_and_said(local):
    local.emulator.services["catalog"].skus = []  # a catalog that lists nothing for Cloud Run
    prices = pricing.prices(local.clients(), "europe-west4", "nvidia-l4")
    assert prices.gpu_s == pricing.BUILT_IN_GPU_S["nvidia-l4"]
    assert prices.source.startswith(f"built-in table of {pricing.BUILT_IN_DATE}")
