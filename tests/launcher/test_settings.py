from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.errors import UserError
from launcher.settings import check_run_timeout
from launcher.settings_sources import load_settings


def test_defaults_follow_the_tutorial(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "my-project")
    settings = load_settings()
    assert settings.region == "europe-west4"
    assert settings.bucket == "my-project-gemma3-finetuning"
    assert settings.secret_id == "HF_TOKEN"
    assert settings.gpu == "nvidia-rtx-pro-6000"
    assert settings.service_account_email == "gemma3-finetuning@my-project.iam.gserviceaccount.com"
    assert settings.image_repository_uri == (
        "europe-west4-docker.pkg.dev/my-project/gemma3-finetuning-repo/gemma3-finetune"
    )
    assert (settings.cpu, settings.memory) == ("20", "80Gi")
    # Within the 1 h Cloud Run allows a GPU task at GA; more is the user's choice.
    assert settings.task_timeout_s == 3600
    assert settings.build_parent == "projects/my-project/locations/global"
    assert settings.launch_stage == "BETA"  # the RTX PRO 6000 is a Preview GPU


def test_launch_stage_is_beta_only_for_preview_features(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "my-project")
    l4 = {"gpu": "nvidia-l4"}
    assert load_settings(None, l4).launch_stage == "GA"
    assert (load_settings(None, l4).cpu, load_settings(None, l4).memory) == ("8", "32Gi")
    assert load_settings(None, l4 | {"task_timeout": "1h"}).launch_stage == "GA"
    assert load_settings(None, l4 | {"task_timeout": "61m"}).launch_stage == "BETA"
    assert load_settings(None, l4 | {"task_timeout": "12h"}).launch_stage == "BETA"
    # Without a GPU: any region, the table's largest shape, up to 168 h at GA.
    cpu_only = load_settings(None, {"gpu": "none", "region": "us-east4", "task_timeout": "100h"})
    assert (cpu_only.cpu, cpu_only.memory, cpu_only.launch_stage) == ("8", "32Gi", "GA")


def test_run_timeout_is_held_to_the_jobs_launch_stage(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "my-project")
    l4 = load_settings(None, {"gpu": "nvidia-l4"})
    with pytest.raises(UserError) as raised:
        check_run_timeout(l4, 2 * 3600)
    assert "Preview of long running GPU jobs" in raised.value.message
    assert "--task-timeout 2h" in raised.value.hint
    check_run_timeout(l4, 3600)
    check_run_timeout(load_settings(None, {"gpu": "nvidia-l4", "task_timeout": "3h"}), 2 * 3600)
    rtx = load_settings()
    check_run_timeout(rtx, 12 * 3600)
    with pytest.raises(UserError, match="at most 12h"):
        check_run_timeout(rtx, 13 * 3600)
    check_run_timeout(load_settings(None, {"gpu": "none"}), 100 * 3600)


def test_precedence_defaults_file_env_flags(monkeypatch, tmp_path):
    config = tmp_path / "gemma-launch.toml"
    config.write_text(
        'project_id = "file-project"\nregion = "us-central1"\njob = "from-file"\n'
        'image = "file-image"\n[trainer]\ntrain-size = 500\n'
    )
    monkeypatch.setenv("REGION", "asia-southeast1")
    monkeypatch.setenv("JOB_NAME", "from-env")
    settings = load_settings(config, {"job_id": None, "job": "from-flag", "trainer": {"eval-size": 20}})
    assert settings.project_id == "file-project"  # file beats default
    assert settings.image == "file-image"
    assert settings.region == "asia-southeast1"  # env beats file
    assert settings.job == "from-flag"  # flag beats env
    assert settings.trainer == {"train-size": 500, "eval-size": 20}


def test_config_in_working_directory_is_found(monkeypatch):
    Path("gemma-launch.toml").write_text('project_id = "cwd-project"\n')
    assert load_settings().project_id == "cwd-project"


@pytest.mark.parametrize(
    ("env", "flags", "message", "hint"),
    [
        ({}, {}, "No Google Cloud project set", "PROJECT_ID"),
        ({"PROJECT_ID": "Bad_Project"}, {}, "project id 'Bad_Project' is invalid", "export PROJECT_ID="),
        (
            {"PROJECT_ID": "my-project", "BUCKET_NAME": "Upper"},
            {},
            "Bucket name 'Upper' is invalid",
            "--bucket",
        ),
        ({"PROJECT_ID": "my-project", "BUCKET_NAME": "goog-bucket"}, {}, "is invalid", "--bucket"),
        ({"PROJECT_ID": "my-project", "BUCKET_NAME": "192.168.1.1"}, {}, "is invalid", "--bucket"),
        ({"PROJECT_ID": "my-project"}, {"region": "europe-west1"}, "not offered in europe-west1", "--region"),
        (
            {"PROJECT_ID": "my-project"},
            {"gpu": "nvidia-l4", "region": "us-east4"},
            "not offered",
            "us-central1",
        ),
        (
            {"PROJECT_ID": "my-project"},
            {"region": "mars-central1"},
            "offers them in us-central1, europe-west4, asia-southeast1",
            "region in gemma-launch.toml",
        ),
        (
            {"PROJECT_ID": "my-project", "REGION": "mars-1"},
            {},
            "'mars-1' is not a Google Cloud region",
            "--region",
        ),
        (
            {"PROJECT_ID": "my-project"},
            {"region": "mars", "gpu": "none"},
            "'mars' is not a Google",
            "--region",
        ),
        ({"PROJECT_ID": "my-project"}, {"cpu": "8"}, "at least 20 CPUs", "--cpu 20"),
        ({"PROJECT_ID": "my-project"}, {"memory": "64Gi"}, "at least 80Gi", "--memory 80Gi"),
        ({"PROJECT_ID": "my-project"}, {"gpu": "nvidia-l4", "cpu": "2"}, "at least 4 CPUs", "--cpu 4"),
        ({"PROJECT_ID": "my-project"}, {"memory": "80 GB"}, "not a memory size", "--memory"),
        ({"PROJECT_ID": "my-project"}, {"cpu": "lots"}, "not a CPU count", "--cpu"),
        ({"PROJECT_ID": "my-project"}, {"task_timeout": "5s"}, "between 10s and 168h", "--task-timeout"),
        ({"PROJECT_ID": "my-project"}, {"task_timeout": "200h"}, "between 10s and 168h", "--task-timeout"),
        ({"PROJECT_ID": "my-project"}, {"task_timeout": "soon"}, "not a duration", "--task-timeout"),
        ({"PROJECT_ID": "my-project"}, {"task_timeout": "13h"}, "at most 12h", "--task-timeout 12h"),
        ({"PROJECT_ID": "my-project"}, {"cpu": "21"}, "20 or 22 CPUs", "--cpu 20"),
        ({"PROJECT_ID": "my-project"}, {"memory": "100Gi"}, "at most 80Gi", "--memory 80Gi"),
        ({"PROJECT_ID": "my-project"}, {"gpu": "nvidia-l4", "cpu": "12"}, "1, 2, 4, 6 or 8 CPUs", "--cpu"),
        (
            {"PROJECT_ID": "my-project"},
            {"gpu": "nvidia-l4", "cpu": "4", "memory": "32Gi"},
            "With 4 CPUs, Cloud Run takes 2Gi to 16Gi",
            "--memory between 2Gi and 16Gi",
        ),
        ({"PROJECT_ID": "my-project"}, {"gpu": "none", "cpu": "3"}, "1, 2, 4, 6 or 8 CPUs", "--cpu"),
        ({"PROJECT_ID": "my-project"}, {"gpu": "none", "memory": "64Gi"}, "4Gi to 32Gi", "--memory"),
        ({"PROJECT_ID": "my-project"}, {"max_retries": 11}, "less than or equal to 10", "--max-retries"),
        (
            {"PROJECT_ID": "my-project", "SERVICE_ACCOUNT": "sa"},
            {},
            "service account id 'sa'",
            "export SERVICE_ACCOUNT=",
        ),
        ({"PROJECT_ID": "my-project", "JOB_NAME": "Job_1"}, {}, "job name 'Job_1'", "export JOB_NAME="),
        ({"PROJECT_ID": "my-project", "AR_REPO": "Repo"}, {}, "repository 'Repo'", "export AR_REPO="),
        (
            {"PROJECT_ID": "my-project", "SECRET_ID": "hf token"},
            {},
            "secret id 'hf token'",
            "export SECRET_ID=",
        ),
        ({"PROJECT_ID": "my-project"}, {"subnet": "sub"}, "subnet is set without a network", "--network"),
        ({"PROJECT_ID": "my-project"}, {"build_location": "Europe"}, "build location", "--build-location"),
        (
            {"PROJECT_ID": "my-project"},
            {"trainer": {"learning_rate": 1}},
            "Unknown trainer setting 'learning_rate'",
            "Did you mean learning-rate?",
        ),
    ],
)
def test_bad_settings_fail_before_any_request(monkeypatch, env, flags, message, hint):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as raised:
        load_settings(None, flags)
    assert message in raised.value.message
    assert hint in raised.value.hint


def test_unknown_key_and_token_in_file_are_refused(tmp_path):
    config = tmp_path / "gemma-launch.toml"
    config.write_text('project_id = "my-project"\ngpus = 2\n')
    with pytest.raises(UserError, match="Unknown setting 'gpus'"):
        load_settings(config)
    config.write_text('project_id = "my-project"\nhf_token = "hf_abc"\n')
    with pytest.raises(UserError, match="contains hf_token"):
        load_settings(config)
    config.write_text("project_id = \n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_settings(config)


def test_missing_config_file_is_an_error():
    with pytest.raises(UserError, match="does not exist"):
        load_settings(Path("nowhere.toml"))


def test_init_writes_a_template_whose_project_placeholder_is_never_used(monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["init"])
    assert result.exit_code == 0, result.output
    assert "uncomment project_id" in result.output
    text = Path("gemma-launch.toml").read_text()
    assert '# region = "europe-west4"' in text and "[trainer]" in text
    assert '\n# project_id = "your-project-id"\n' in text
    missing = runner.invoke(main, ["up", "--dry-run"])
    assert missing.exit_code == 2
    assert "Error: No Google Cloud project set." in missing.output

    Path("gemma-launch.toml").write_text(text.replace("# project_id =", "project_id ="))
    placeholder = runner.invoke(main, ["up", "--dry-run"])
    assert placeholder.exit_code == 2, placeholder.output
    assert (
        "Error: Invalid project_id in gemma-launch.toml: 'your-project-id' is the placeholder `gemma-launch "
        "init` wrote, not a project." in placeholder.output
    )
    assert 'Hint: Write project_id = "my-project-123" in gemma-launch.toml.' in placeholder.output
    monkeypatch.setenv("PROJECT_ID", "my-project")
    assert load_settings().project_id == "my-project"  # the environment beats the file's placeholder

    again = runner.invoke(main, ["init"])
    assert again.exit_code == 2
    assert "already exists" in again.output and "--force" in again.output
    assert runner.invoke(main, ["init", "--force"]).exit_code == 0
    # Written elsewhere, the file is read only through --config: the next command says so.
    elsewhere = runner.invoke(main, ["init", "--path", "settings/demo.toml"])
    assert elsewhere.exit_code == 0, elsewhere.output
    assert elsewhere.output.endswith("then run `gemma-launch up --config settings/demo.toml`.\n")
    assert "then run `gemma-launch up`." in runner.invoke(main, ["init", "--force"]).output


@pytest.mark.parametrize(
    ("argv", "env", "toml", "error", "hint"),
    [
        (
            ["--project", "My_Project"],
            {},
            "",
            "Error: Invalid --project: project id 'My_Project' is invalid",
            "Hint: Pass --project my-project-123. project_id: Google Cloud project id",
        ),
        (
            [],
            {"PROJECT_ID": "My_Project"},
            "",
            "Error: Invalid $PROJECT_ID: project id 'My_Project' is invalid",
            "Hint: export PROJECT_ID=my-project-123.",
        ),
        (
            [],
            {},
            'project_id = "my-project"\nmemory = 80\n',
            "Error: Invalid memory in gemma-launch.toml: '80' is not a memory size like 80Gi, 32G or "
            "16384Mi.",
            'Hint: Write memory = "80Gi" in gemma-launch.toml. memory: Memory per task',
        ),
        (
            [],
            {},
            'project_id = "my-project"\nmax_retries = "lots"\n',
            "Error: Invalid max_retries in gemma-launch.toml: expected a whole number, got 'lots'.",
            "Hint: Write max_retries = 3 in gemma-launch.toml.",
        ),
        (
            [],
            {},
            'project_id = "my-project"\ngpu = "l4"\n',
            "Error: Invalid gpu in gemma-launch.toml: 'l4' is not one of 'nvidia-rtx-pro-6000', "
            "'nvidia-l4' or 'none'.",
            'Hint: Write gpu = "nvidia-l4" in gemma-launch.toml.',
        ),
        (
            ["--max-retries", "11"],
            {"PROJECT_ID": "my-project"},
            "",
            "Error: Invalid --max-retries: Input should be less than or equal to 10, got 11.",
            "Hint: Pass --max-retries 3. max_retries: Retries of a failed or preempted task (0-10).",
        ),
        (
            [],
            {},
            'project_id = "my-project"\nregoin = "us-central1"\n',
            "Error: Unknown setting 'regoin' in gemma-launch.toml.",
            "Hint: Did you mean region? Known settings: project_id, region,",
        ),
        (
            [],
            {},
            'project_id = "my-project"\nlearning-rate = 1e-4\n',
            "Error: Unknown setting 'learning-rate' in gemma-launch.toml: it is a trainer setting.",
            "Hint: Move it under the [trainer] table of gemma-launch.toml.",
        ),
        (
            [],
            {},
            'project_id = "my-project"\n[trainer]\nlearning_rate = 1e-4\n',
            "Error: Unknown trainer setting 'learning_rate' (learning_rate = 0.0001 in [trainer] of "
            "gemma-launch.toml).",
            "Hint: Did you mean learning-rate? Settings: train-size, eval-size,",
        ),
        (
            [],
            {},
            'project_id = "my-project"\n[trainer]\nlearning-rate = "fast"\n',
            "Error: Invalid learning-rate = 'fast' in [trainer] of gemma-launch.toml: must be a positive "
            "number, got 'fast'.",
            "Hint: learning-rate takes a positive number (default 0.0002).",
        ),
        (
            [],
            {},
            'project_id = "my-project"\n[trainer]\nmax-memory-gib = 0\n',
            "Error: Invalid max-memory-gib = 0 in [trainer] of gemma-launch.toml: must be a positive number",
            "Hint: max-memory-gib takes a positive number (default 85.0).",
        ),
        (
            [],
            {},
            'project_id = "my-project"\n[trainer]\noutput-dir = "/tmp/out"\n',
            "Error: output-dir = '/tmp/out' in [trainer] of gemma-launch.toml: output-dir is not a setting: "
            "each execution writes to gs://BUCKET/runs/<execution>/",
            "Hint: Leave it out;",
        ),
    ],
)
def test_a_bad_setting_names_where_it_came_from_and_how_to_write_it(
    argv, env, toml, error, hint, monkeypatch
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if toml:
        Path("gemma-launch.toml").write_text(toml)
    result = CliRunner().invoke(main, ["up", "--dry-run", *argv])
    assert result.exit_code == 2, result.output
    assert error in result.output, result.output
    assert hint in result.output, result.output
    assert "Input should be a valid" not in result.output and "Hint: Change" not in result.output
    assert "--project-id" not in result.output


def test_cli_reports_bad_settings_with_error_and_hint_and_exit_2(monkeypatch):
    monkeypatch.setenv("PROJECT_ID", "my-project")
    result = CliRunner().invoke(
        main, ["up", "--gpu", "nvidia-l4", "--region", "europe-west1", "--memory", "8Gi"]
    )
    assert result.exit_code == 2
    assert "Error: Cloud Run needs at least 16Gi" in result.output
    assert "Hint: Use --memory 16Gi" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["up", "--dry-run"], ["run"], ["status"], ["doctor"]])
def test_an_unknown_region_names_where_the_gpu_is_offered_in_every_command(monkeypatch, command):
    monkeypatch.setenv("PROJECT_ID", "my-project")
    Path("gemma-launch.toml").write_text('gpu = "nvidia-l4"\n')  # status takes no --gpu flag
    result = CliRunner().invoke(main, [*command, "--region", "mars-1"])
    assert result.exit_code == 2, result.output
    where = "us-central1, europe-west1, europe-west4, asia-southeast1"
    assert (
        "'mars-1' is not a Google Cloud region: regions are named like us-central1. "
        f"Cloud Run Jobs offers nvidia-l4 GPUs in {where}." in result.output
    )
    assert f"Use --region with one of {where} (or set REGION" in result.output  # doctor: "Fix:"


def test_emulator_start_refuses_a_build_region_list_it_cannot_read():
    result = CliRunner().invoke(main, ["emulator", "start", "--build-regions", "us-central1,Europe West"])
    assert result.exit_code == 2
    assert "Error: Invalid --build-regions" in result.output and "Europe West" in result.output
    assert "Hint: List regions like us-central1,europe-west1, or pass all." in result.output
