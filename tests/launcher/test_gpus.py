"""Every GPU and model the launcher accepts either runs or is refused before anything is created or started
(issue 21): the image's CUDA against Cloud Run's driver first, then the model against the GPU's memory."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher import gpus, staging
from launcher.cli import main
from launcher.errors import UserError
from launcher.job import trainer_args
from launcher.settings import Settings
from launcher.settings_sources import load_settings
from tests.support.image_source import image_source

PROJECT = "demo-project"
TOKEN = "hf_gpu_test_token_0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(fresh, monkeypatch):
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return fresh


def up(*args: str):
    return CliRunner().invoke(main, ["up", "--skip-build", "--skip-stage", *args])


def error_and_hint(result) -> tuple[str, str]:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert [line.split(":")[0] for line in lines] == ["Error", "Hint"], result.output
    assert "Traceback" not in result.output
    return lines[0], lines[1]


def test_up_on_an_l4_is_refused_for_the_driver_before_any_request(env):
    """The default model on an L4 is the one that fits it, 4B; the image's CUDA 13 torch needs driver 580
    and Cloud Run runs the L4 with 535."""
    error, hint = error_and_hint(up("--gpu", "nvidia-l4"))
    assert error == (
        "Error: The image cannot use Cloud Run's L4: its torch 2.13.0 is built for CUDA 13, which needs "
        "NVIDIA driver 580 or newer, and Cloud Run runs the L4 with driver 535.216.03 (CUDA 12) "
        "(docs/container.md)."
    )
    assert hint == (
        "Hint: Use --gpu nvidia-rtx-pro-6000 (driver 580), or --gpu none to rehearse the job on CPU."
    )
    assert env.record() == []


def test_27b_on_an_l4_gets_the_driver_refusal_whose_fix_also_fits_27b(env):
    """Both checks fail: the driver is said first, since another GPU fixes both and another model neither."""
    error, hint = error_and_hint(up("--gpu", "nvidia-l4", "--model-id", "google/gemma-3-27b-it"))
    assert "cannot use Cloud Run's L4" in error and "--gpu nvidia-rtx-pro-6000" in hint
    assert env.record() == []


def test_with_an_l4_image_27b_in_weights_its_memory_cannot_hold_is_refused_with_what_runs_instead(l4_image):
    with pytest.raises(UserError) as refused:
        gpus.check("nvidia-l4", "google/gemma-3-27b-it", "int8")
    assert refused.value.message == (
        "Gemma 3 27B does not fit an L4 (24 GB) in int8: its weights alone take 27.3 GiB "
        "(docs/benchmarks.md)."
    )
    assert refused.value.hint.startswith("Gemma 3 27B needs the RTX PRO 6000 (--gpu nvidia-rtx-pro-6000); ")
    assert "on an L4 it runs in 4bit" in refused.value.hint
    assert refused.value.hint.endswith("on an L4 use --model-id google/gemma-3-4b-it.")


def test_with_an_l4_image_the_default_model_is_4b_said_and_provisioning_goes_on(env, l4_image):
    result = up("--gpu", "nvidia-l4")
    assert result.exit_code == 0, result.output
    assert (
        "Note: model google/gemma-3-4b-it, the default on an L4: Gemma 3 27B runs only slowly there."
        in result.output
    )
    assert any(line.split()[:2] == ["created", "bucket"] for line in result.output.splitlines())


def test_27b_on_an_l4_in_4bit_is_stated_as_slow_with_its_measured_speed_and_goes_on(env, l4_image):
    """Measured on the H200 at 22 GiB: it trains, slowly; `up` says so and provisions."""
    result = up("--gpu", "nvidia-l4", "--model-id", "google/gemma-3-27b-it")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert (
        "Note: Gemma 3 27B in 4bit (--quantization auto) runs slowly on an L4: batch 1, every layer "
        "checkpointed, 0.63 samples/s on an H200 capped at 22 GiB (gpu-call29)" in said
    )


def test_run_checks_the_job_as_it_exists_before_starting_it(env, l4_image, tmp_path: Path):
    """A job made for an L4 and then pointed at 27B by hand: `run` checks it, with the --set that changes
    its weights, and refuses what cannot run before RunJob."""
    source = image_source(tmp_path / "image", ["python", "-c", "print(1)"])
    made = CliRunner().invoke(main, ["up", "--skip-stage", "--source", str(source), "--gpu", "nvidia-l4"])
    assert made.exit_code == 0, made.output
    jobs = env.clients(PROJECT).jobs
    job = jobs.get_job(name=f"projects/{PROJECT}/locations/europe-west4/jobs/gemma3-finetuning-job")
    args = list(job.template.template.containers[0].args)
    assert args[1] == "/mnt/gcs/google/gemma-3-4b-it"
    args[1] = "/mnt/gcs/google/gemma-3-27b-it"
    job.template.template.containers[0].args = args
    jobs.update_job(job=job).result()
    env.record_path.write_text("")

    l4 = ["run", "--gpu", "nvidia-l4"]  # the job's GPU (run refuses another)
    error, hint = error_and_hint(CliRunner().invoke(main, [*l4, "--set", "quantization=int8"]))
    assert error.startswith("Error: Gemma 3 27B does not fit an L4 (24 GB) in int8: its weights alone take")
    assert hint.startswith("Hint: The job was made for this combination; make it anew with `gemma-launch up`")
    error, _ = error_and_hint(CliRunner().invoke(main, [*l4, "--set", "quantization=none"]))
    assert "in bf16: its weights alone take 51.1 GiB" in error
    assert [entry["method"] for entry in env.record()] == ["GetJob", "GetJob"]


def test_the_job_passes_the_gpu_budget_the_table_was_measured_within():
    l4 = load_settings(None, {"project_id": PROJECT, "gpu": "nvidia-l4"})
    assert l4.model_id == "google/gemma-3-4b-it"
    args = trainer_args(l4, "google/gemma-3-4b-it", "datasets/oxford-iiit-pet")
    assert args[args.index("--max-memory-gib") + 1] == "22"
    rtx = load_settings(None, {"project_id": PROJECT})
    assert rtx.model_id == "google/gemma-3-27b-it"
    args = trainer_args(rtx, "google/gemma-3-27b-it", "datasets/oxford-iiit-pet")
    assert args[args.index("--max-memory-gib") + 1] == "85"
    named = load_settings(None, {"project_id": PROJECT, "gpu": "nvidia-l4", "model_id": "my/model"})
    assert (named.model_id, named.model_defaulted) == ("my/model", False)


def test_models_are_recognised_by_name_or_by_a_local_config(tmp_path: Path):
    assert gpus.identify("google/gemma-3-27b-it") == gpus.MODELS["27b"]
    assert gpus.identify("/mnt/gcs/google/gemma-3-4b-pt") == gpus.MODELS["4b"]
    local = tmp_path / "my-finetune"
    local.mkdir()
    config = {"text_config": {"hidden_size": 5376, "num_hidden_layers": 62}}
    (local / "config.json").write_text(json.dumps(config))
    assert gpus.identify(str(local)) == gpus.MODELS["27b"]
    (local / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 64}}))
    assert gpus.identify(str(local)) is None
    assert gpus.check("nvidia-rtx-pro-6000", str(local)) is None  # not in the table: not checked


def test_auto_weights_are_what_the_trainer_picks_within_each_gpus_budget():
    """The launcher's AUTO table against the trainer's own rule, with the weights of the published
    configs (bench/configs) as the trainer counts them."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForImageTextToText, Gemma3Config

    from trainer.modeling import LANGUAGE_MODEL_LINEAR
    from trainer.speed.int8_weights import int8_weight_bytes
    from trainer.speed.weights import precision_for

    for size in gpus.MODELS:
        config = json.loads((REPO / f"bench/configs/gemma-3-{size}-it.json").read_text())
        with torch.device("meta"):
            shell = AutoModelForImageTextToText.from_config(Gemma3Config(**config))
        text = shell.config.text_config
        assert (text.hidden_size, text.num_hidden_layers) == gpus.MODELS[size].text_shape
        bf16 = 2 * sum(p.numel() for p in shell.parameters())
        int8 = int8_weight_bytes(shell, LANGUAGE_MODEL_LINEAR)
        for name, gpu in gpus.GPUS.items():
            picked = precision_for(bf16, int8, gpu.memory_gib * 2**30, gpu.gigabytes * 1e9)
            assert picked == gpus.AUTO[(name, size)], (name, size)


def test_every_gpu_the_settings_take_has_a_verdict_for_every_model_and_weights():
    assert set(gpus.GPUS) | {"none"} == set(typing.get_args(Settings.model_fields["gpu"].annotation))
    for gpu in gpus.GPUS:
        for size in gpus.MODELS:
            for weights in ("bf16", "int8", "fp8", "4bit"):
                assert gpus.FITS[(gpu, size, weights)].verdict in ("runs", "slow", "no")


def test_an_l4_replaces_the_27b_default_staged_before_but_keeps_a_directory_named_then(local, tmp_path):
    client = local.clients(PROJECT).storage
    bucket = client.create_bucket(f"{PROJECT}-gemma3-finetuning", location="europe-west4")
    l4 = load_settings(None, {"project_id": PROJECT, "gpu": "nvidia-l4"})

    def staged_last(source: str) -> str:
        entry = {"source": source, "revision": None, "prefix": "x", "default": "google/gemma-3-27b-it"}
        bucket.blob(staging.SOURCES).upload_from_string(json.dumps({"model": entry}))
        return staging.choose_sources(client, l4, None, "pets", None).model

    assert staged_last("google/gemma-3-27b-it") == "google/gemma-3-4b-it"
    assert staged_last(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
    # A model_id given, not defaulted: the directory stood in for another one and gives way.
    four = "google/gemma-3-4b-it"
    named = load_settings(None, {"project_id": PROJECT, "gpu": "nvidia-l4", "model_id": four})
    assert staging.choose_sources(client, named, None, "pets", None).model == four
