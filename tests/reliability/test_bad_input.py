"""Bad input, across CLI flags, gemma-launch.toml, environment variables and trainer flags.

Each launcher case must end with exactly one `Error:` line and a `Hint:` line, exit status 2, no
traceback, and no mutating request in the emulator's record. Trainer cases run `python -m trainer`'s
main() with the real tiny model and synthetic pets; the trainer prints one `Error:` line and one `Hint:`
line and exits 2 before writing anything.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.emulator.record import read_record
from launcher.emulator.server import Emulator
from tests.support.emulator import emulator_in
from tests.support.reliability import PROJECT, TOKEN

UP = ["up", "--skip-stage", "--skip-build"]

# (id, argv, environment (None: unset), gemma-launch.toml text or None)
LAUNCHER_CASES: list[tuple[str, list[str], dict[str, str | None], str | None]] = [
    ("flag: malformed project id", [*UP, "--project", "Bad_Project"], {}, None),
    ("flag: project id too short", [*UP, "--project", "abc"], {}, None),
    ("flag: GPU not offered in region", [*UP, "--region", "europe-west1"], {}, None),
    ("flag: region that does not exist", [*UP, "--region", "mars-central1"], {}, None),
    ("flag: too few CPUs for RTX PRO 6000", [*UP, "--cpu", "8"], {}, None),
    ("flag: too little memory for RTX PRO 6000", [*UP, "--memory", "32Gi"], {}, None),
    (
        "flag: too little memory for L4",
        [*UP, "--gpu", "nvidia-l4", "--cpu", "4", "--memory", "8Gi"],
        {},
        None,
    ),
    ("flag: malformed memory", [*UP, "--memory", "80GB"], {}, None),
    ("flag: malformed cpu", [*UP, "--cpu", "lots"], {}, None),
    ("flag: task timeout too short", [*UP, "--task-timeout", "5s"], {}, None),
    ("flag: task timeout over 168h", [*UP, "--task-timeout", "200h"], {}, None),
    ("flag: malformed task timeout", [*UP, "--task-timeout", "soon"], {}, None),
    ("flag: max retries over 10", [*UP, "--max-retries", "11"], {}, None),
    ("flag: bucket name GCS rejects (goog)", [*UP, "--bucket", "goog-weights"], {}, None),
    ("flag: bucket name with capitals", [*UP, "--bucket", "My_Bucket"], {}, None),
    ("flag: bucket name as an IP address", [*UP, "--bucket", "192.168.1.1"], {}, None),
    ("flag: job name Cloud Run rejects", [*UP, "--job", "Fine_Tune"], {}, None),
    ("flag: repository name with '!'", [*UP, "--repository", "repo!"], {}, None),
    ("flag: secret id with a space", [*UP, "--secret-id", "hf token"], {}, None),
    ("flag: service account id too short", [*UP, "--service-account", "sa"], {}, None),
    ("flag: image name with a tag", [*UP, "--image", "Trainer:latest"], {}, None),
    ("flag: subnet without network", [*UP, "--subnet", "default"], {}, None),
    ("flag: run --set unknown key", ["run", "--set", "learning_rate=1"], {}, None),
    ("flag: run --set without '='", ["run", "--set", "learning-rate"], {}, None),
    ("flag: run --set value the trainer refuses", ["run", "--set", "learning-rate=abc"], {}, None),
    ("flag: run --set a flag gemma-launch sets", ["run", "--set", "output-dir=/tmp/out"], {}, None),
    ("flag: up --model-source that does not exist", ["up", "--model-source", "./missing-model"], {}, None),
    ("flag: run --timeout malformed", ["run", "--timeout", "5 minutes"], {}, None),
    ("flag: run before any up", ["run"], {}, None),
    ("flag: results before any run", ["results"], {}, None),
    ("flag: --config that does not exist", [*UP, "--config", "missing.toml"], {}, None),
    ("env: missing HF token on a first up", UP, {"HF_TOKEN": None}, None),
    ("env: no project at all", UP, {"PROJECT_ID": None}, None),
    ("env: REGION without the GPU", UP, {"REGION": "us-east1"}, None),
    ("env: BUCKET_NAME containing google", UP, {"BUCKET_NAME": "my-google-bucket"}, None),
    ("env: JOB_NAME with capitals", UP, {"JOB_NAME": "Job_1"}, None),
    ("env: SECRET_ID with a slash", UP, {"SECRET_ID": "hf/token"}, None),
    ("env: SERVICE_ACCOUNT too short", UP, {"SERVICE_ACCOUNT": "x"}, None),
    ("toml: unknown key", UP, {}, 'colour = "blue"\n'),
    ("toml: not TOML", UP, {}, "project_id = \n"),
    ("toml: hf_token in the file", UP, {}, 'hf_token = "hf_x"\n'),
    ("toml: unknown trainer key", UP, {}, "[trainer]\nlearning_rate = 1\n"),
    ("toml: max_retries not a number", UP, {}, 'max_retries = "lots"\n'),
    ("toml: memory as a bare number", UP, {}, "memory = 80\n"),
    ("toml: trainer value the trainer refuses", UP, {}, '[trainer]\ncompile = "yes"\n'),
    ("toml: init's placeholder project", UP, {"PROJECT_ID": None}, 'project_id = "your-project-id"\n'),
    ("toml: L4 with 2 CPUs", UP, {}, 'gpu = "nvidia-l4"\ncpu = "2"\nmemory = "16Gi"\n'),
]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Emulator, Path]]:
    root = tmp_path_factory.mktemp("bad-input")
    with emulator_in(root, gpu_quota=1) as running:
        yield running, root / "record.jsonl"


@pytest.mark.parametrize(
    ("argv", "env", "toml"),
    [case[1:] for case in LAUNCHER_CASES],
    ids=[case[0] for case in LAUNCHER_CASES],
)
def test_bad_launcher_input_is_one_error_and_a_hint_and_changes_nothing(
    argv, env, toml, emulator, monkeypatch, figures
):
    running, record = emulator
    monkeypatch.setenv("GEMMA_LAUNCH_EMULATOR_HOST", running.host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", running.storage_host)
    monkeypatch.setenv("PROJECT_ID", PROJECT)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    if toml is not None:
        Path("gemma-launch.toml").write_text(toml)
    before = len(read_record(record))
    result = CliRunner().invoke(main, argv)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len([line for line in lines if line.startswith("Error:")]) == 1, lines
    assert len([line for line in lines if line.startswith("Hint:")]) == 1, lines
    # A first `up` enables the APIs before it asks for the token; enabling APIs is all it may change.
    changes = [entry["method"] for entry in read_record(record)[before:] if entry["mutating"]]
    assert [method for method in changes if method != "BatchEnableServices"] == []
    figures(bad_inputs=1, bad_inputs_rejected_cleanly=1)


# (id, trainer flags, the start of the error); {tiny}/{pets}/{tmp} are filled in.
TRAINER_CASES = [
    ("trainer: train size 0", ["--train-size", "0"], "argument --train-size"),
    ("trainer: eval size over the test split", ["--eval-size", "500"], "--eval-size 500 is larger"),
    ("trainer: learning rate not a number", ["--learning-rate", "fast"], "argument --learning-rate"),
    ("trainer: unknown flag", ["--epochs", "3"], "unrecognized arguments"),
    ("trainer: model dir without config", ["--model-id", "{tmp}/empty-model"], "model directory"),
    ("trainer: model dir without weights", ["--model-id", "{weightless}"], "cannot load the model weights"),
    ("trainer: empty dataset directory", ["--dataset", "{tmp}/empty-pets"], "has neither"),
    ("trainer: corrupt image", ["--dataset", "{corrupt}"], "cannot read image"),
]


@pytest.fixture(scope="module")
def trainer_inputs(
    tiny_model: Path, weightless_model: Path, few_pets: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trainer-inputs")
    shutil.copytree(few_pets, root / "corrupt")
    first = sorted((root / "corrupt" / "images").glob("*.jpg"))[0]
    first.write_bytes(b"not a jpeg at all")
    (root / "empty-model").mkdir()
    (root / "empty-pets").mkdir()
    return {
        "tiny": tiny_model,
        "pets": few_pets,
        "weightless": weightless_model,
        "corrupt": root / "corrupt",
        "tmp": root,
    }


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    TRAINER_CASES,
    ids=[case.values[0] if hasattr(case, "values") else case[0] for case in TRAINER_CASES],
)
def test_bad_trainer_input_is_an_error_and_a_hint_and_exit_2(
    name, flags, message, trainer_inputs, capsys, figures
):
    from trainer.__main__ import main as trainer_main

    out = trainer_inputs["tmp"] / "out"
    base = ["--model-id", str(trainer_inputs["tiny"]), "--dataset", str(trainer_inputs["pets"])]
    base += ["--train-size", "74", "--eval-size", "37", "--device", "cpu", "--output-dir", str(out)]
    flags = [flag.format(**trainer_inputs) for flag in flags]
    try:
        code = trainer_main([*base, *flags])
    except SystemExit as exit_:
        code = exit_.code
    stderr = capsys.readouterr().err
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    error, hint = lines
    assert error.startswith("Error: ") and hint.startswith("Hint: "), stderr
    assert message in error
    assert "Traceback" not in stderr
    # The trainer proves its output dir writable before anything else; bad input leaves no file there.
    assert not [path for path in out.rglob("*") if path.is_file()]
    figures(bad_inputs=1, bad_inputs_rejected_cleanly=1)
