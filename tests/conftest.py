from __future__ import annotations

import pytest

from launcher.settings import ENV_VARS


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's own project, token or gemma-launch.toml."""
    for name in [*ENV_VARS, "HF_TOKEN", "GEMMA_LAUNCH_EMULATOR_HOST", "STORAGE_EMULATOR_HOST"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
