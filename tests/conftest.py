from __future__ import annotations

import pytest

from launcher.settings import ENV_VARS


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's own project, token or gemma-launch.toml."""
    for name in [*ENV_VARS, "HF_TOKEN", "GEMMA_LAUNCH_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    # No test finds the developer's own Google credentials, nor probes the real metadata server's
    # link-local address: google-auth asks GCE_METADATA_IP, here a closed port on this machine.
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path_factory.mktemp("gcloud-config")))
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
