"""Fixtures every test directory shares: an isolated environment, the emulator, the tiny Gemma 3 and the
synthetic pets. The model and the pets are built once per session and only read by tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from launcher import cloud, gpus
from launcher.apis import REQUIRED
from launcher.settings_sources import ENV_VARS
from tests.support.emulator import Local, emulated


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make test`'s workers (--dist loadgroup) the trainer's tests run one after another on one
    worker: they are the CPU-bound part of the suite, and there they share the session's trained models
    instead of each worker training its own, while the rest, which mostly waits, shares the others."""
    for item in items:
        if item.path.is_relative_to(TRAINER_TESTS):
            item.add_marker(pytest.mark.xdist_group("trainer"))


TRAINER_TESTS = Path(__file__).parent / "trainer"

# A project whose Cloud Run GPU quota request was granted, with room for two GPU tasks at once (a fresh
# project has none: tests of that case set it to 0 with services["quotas"].set_gpu_quota).
GPU_QUOTA = 2
PROJECT = "demo-project"


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
    # Nor an API that an earlier test's `up` enabled in this process: its SERVICE_DISABLED would be retried.
    monkeypatch.setattr(cloud.ENABLED, "_at", {})
    # Nor the accounts it granted roles to: their refusals would be retried.
    monkeypatch.setattr(cloud.GRANTED, "_at", {})


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Local]:
    """The emulator as a new project is: only Google's default APIs on, the caller its owner; a new
    service account, a just-enabled API and a role just granted each take a moment to be usable, as in
    Google Cloud."""
    with emulated(
        tmp_path, iam_propagation_s=0.5, api_propagation_s=0.5, grant_propagation_s=0.5, gpu_quota=GPU_QUOTA
    ) as emulator:
        yield Local(emulator, tmp_path / "record.jsonl")


@pytest.fixture
def local(fresh: Local) -> Local:
    """A project whose APIs are on, as `up` leaves it: for tests of one step of the flow."""
    # Written into the project's record as Service Usage does: enabling them over the wire waits on a
    # long-running operation, most of a second in each of some 200 tests.
    fresh.emulator.access.update_project(
        PROJECT, lambda record: record.update(services=sorted({*record["services"], *REQUIRED}))
    )
    # Such tests grant right after creating an account, and use the role at once.
    fresh.emulator.access.propagation_s = 0.0
    fresh.emulator.access.grant_propagation_s = 0.0
    fresh.record_path.write_text("")  # tests assert on the calls they make themselves
    return fresh


# The trainer modules import torch and transformers: imported where a fixture needs them, so that running
# only launcher tests does not pay for them.


@pytest.fixture
def l4_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if `up` built an image with a CUDA 12 torch for the L4, whose driver (535) the image's CUDA 13
    torch cannot use: for tests of L4 jobs past that refusal (launcher/gpus.py)."""
    monkeypatch.setitem(gpus.IMAGE_CUDA, "nvidia-l4", 12)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Gemma 3 in a directory named like the demo's, as staging names the bucket prefix
    after it."""
    from trainer.offline.tiny import build

    path = tmp_path_factory.mktemp("tiny") / "tiny-gemma3"
    build(path)
    return path


@pytest.fixture(scope="session")
def weightless_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model without its weights file: anything that loads weights from it fails."""
    import shutil

    path = tmp_path_factory.mktemp("weightless") / "model"
    shutil.copytree(tiny_model, path, ignore=shutil.ignore_patterns("*.safetensors"))
    return path


@pytest.fixture(scope="session")
def synthetic_pets(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """synthetic_pets(per_class, test_per_class): a synthetic Oxford-IIIT Pet set in the official layout,
    in a directory named like the demo's, built once per size in the session. Copy it before changing it."""
    from trainer.offline.synthetic import write_dataset

    built: dict[tuple[int, int], Path] = {}

    def pets_of_size(per_class: int, test_per_class: int) -> Path:
        if (per_class, test_per_class) not in built:
            path = tmp_path_factory.mktemp(f"pets-{per_class}-{test_per_class}") / "oxford-iiit-pet"
            write_dataset(path, per_class=per_class, test_per_class=test_per_class)
            built[per_class, test_per_class] = path
        return built[per_class, test_per_class]

    return pets_of_size


@pytest.fixture(scope="session")
def pets(synthetic_pets: Callable[[int, int], Path]) -> Path:
    """740 train / 222 test images: enough for the tiny model to learn well above chance."""
    return synthetic_pets(20, 6)


@pytest.fixture(scope="session")
def few_pets(synthetic_pets: Callable[[int, int], Path]) -> Path:
    """74 train / 37 test images: the smallest set with two of each breed, for flows that stage the set."""
    return synthetic_pets(2, 1)
