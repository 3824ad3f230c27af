"""Cloud Quotas in the emulator: Cloud Run's GPU quotas, read through the real cloudquotas_v1 client."""

import pytest
from click.testing import CliRunner
from google.api_core import exceptions

from launcher.cli import main
from launcher.cloud import Clients
from launcher.emulator.server import Emulator

PROJECT = "demo-project"
SERVICE = f"projects/{PROJECT}/locations/global/services/run.googleapis.com"
IDS = {
    "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion",
    "NvidiaL4GpuAllocPerProjectRegion",
    "NvidiaRtxPro6000GpuAllocNoZonalRedundancyPerProjectRegion",
    "NvidiaRtxPro6000GpuAllocPerProjectRegion",
}


def value(info, region: str) -> int:
    for dimensions in info.dimensions_infos:
        if dimensions.dimensions.get("region", region) == region:
            return dimensions.details.value
    raise AssertionError(f"no value for {region}")


def test_a_fresh_project_has_no_cloud_run_gpu_quota_anywhere(tmp_path, monkeypatch):
    with Emulator(data_dir=tmp_path / "cloud", enabled_apis=("cloudquotas.googleapis.com",)) as emulator:
        monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", emulator.host)
        quotas = Clients(PROJECT).quotas
        infos = list(quotas.list_quota_infos(parent=SERVICE))
        assert {info.quota_id for info in infos} == IDS
        for info in infos:
            assert info.service == "run.googleapis.com"
            assert list(info.dimensions) == ["region"]
            assert info.service_request_quota_uri.startswith("https://console.cloud.google.com/")
            assert value(info, "europe-west4") == value(info, "us-central1") == 0
        one = quotas.get_quota_info(
            name=f"{SERVICE}/quotaInfos/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion"
        )
        assert one.metric == "run.googleapis.com/nvidia_l4_gpu_allocation_no_zonal_redundancy"
        with pytest.raises(exceptions.NotFound):
            quotas.get_quota_info(name=f"{SERVICE}/quotaInfos/NvidiaT4GpuAllocPerProjectRegion")
        assert (
            list(
                quotas.list_quota_infos(
                    parent=f"projects/{PROJECT}/locations/global/services/compute.googleapis.com"
                )
            )
            == []
        )


def test_a_granted_quota_applies_to_every_region_rtx_in_milli_gpus(local):
    local.emulator.services["quotas"].set_gpu_quota(1)
    quotas = local.clients(PROJECT).quotas
    l4 = quotas.get_quota_info(name=f"{SERVICE}/quotaInfos/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion")
    rtx = quotas.get_quota_info(name=f"{SERVICE}/quotaInfos/NvidiaRtxPro6000GpuAllocPerProjectRegion")
    assert value(l4, "asia-southeast1") == 1
    assert value(rtx, "europe-west4") == 1000


def test_emulator_start_grants_the_gpu_quota_it_is_given(monkeypatch, tmp_path):
    granted = {}

    def serve(emulator: Emulator) -> None:  # instead of serving until Ctrl-C
        granted["gpus"] = emulator.services["quotas"].gpu_limit(PROJECT, "europe-west4", "nvidia-l4", False)

    monkeypatch.setattr(Emulator, "serve", serve)
    result = CliRunner().invoke(
        main, ["emulator", "start", "--data-dir", str(tmp_path / "d"), "--gpu-quota", "3"]
    )
    assert result.exit_code == 0, result.output
    assert granted == {"gpus": 3}
    assert "--gpu-quota" in CliRunner().invoke(main, ["emulator", "start", "--help"]).output
