"""The process every task of one execution runs, adapted from the container to this machine.

RunJob starts each task as a local process (launcher/emulator/tasks.py) from the image's snapshot
directory, the one Cloud Build wrote for the image's digest:

- argv: the container's command, else the image ENTRYPOINT, then the container's args (after the
  overrides), else the image CMD (Kubernetes semantics). A leading python/python3 becomes the
  emulator's own interpreter, which has the project's dependencies installed.
- env: PATH/LANG of the emulator, HOME in a per-task directory, PYTHONUNBUFFERED=1,
  PYTHONPATH=snapshot; then the image env (less PATH and HOME, which name the container's filesystem),
  the container env with the overrides merged over it, the secrets resolved from Secret Manager, the
  CLOUD_RUN_* variables and STORAGE_EMULATOR_HOST.
- Paths: a GCS volume mounted at e.g. /mnt/gcs is what a gcsfuse mount looks like to the process, so
  every occurrence of the mount path as a path prefix in argv and env values is rewritten to the
  bucket's directory in the storage emulator; the image's WORKDIR likewise becomes the snapshot dir.
- GPU: the emulator has no Cloud Run GPU to give a task that asks for one, so such a task runs on this
  machine's CPU, and an argv pair `--device cuda` (how the job tells the trainer to insist on the GPU)
  becomes `--device cpu`, with a system log line saying so. Like the interpreter and path rewrites, it
  adapts the container to this machine; nothing else about the job changes.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from google.cloud import run_v2

from launcher.emulator import local_python
from launcher.emulator.access import Access, compute_default_account
from launcher.emulator.artifactregistry import ArtifactRegistry
from launcher.emulator.cloudbuild import CloudBuild
from launcher.emulator.metadata import MetadataServer
from launcher.emulator.rpc import ApiError
from launcher.emulator.run_resources import Context, secret_name
from launcher.emulator.secretmanager import SecretManager
from launcher.emulator.storage import CloudStorage
from launcher.emulator.tasks import Launch


class RunFailure(Exception):
    """The execution cannot start (image or secret gone since the job was created)."""


class TaskProcess:
    """argv, env and working directory of one execution's tasks, resolved once by `prepare`.

    `system(text, severity)` writes a line to the execution's system log.
    """

    def __init__(
        self,
        context: Context,
        execution: run_v2.Execution,
        system: Callable[[str, str], None],
        *,
        access: Access,
        registry: ArtifactRegistry,
        builds: CloudBuild,
        storage: CloudStorage,
        secrets: SecretManager,
        data_dir: Path,
    ) -> None:
        self.context = context
        self.execution = execution
        self.system = system
        self.access = access
        self.registry = registry
        self.builds = builds
        self.storage = storage
        self.secrets = secrets
        self.data_dir = data_dir
        self._argv: list[str] = []
        self._env: dict[str, str] = {}
        self._cwd = Path()
        self._rewrites: dict[str, str] = {}
        self.metadata: MetadataServer | None = None

    def prepare(self) -> None:
        """Resolve the image's snapshot, the command, the env and the mounts, once per execution."""
        container = self.execution.template.containers[0]
        image = self.registry.find_image(container.image)
        if image is None:
            raise RunFailure(f"Image '{container.image}' not found.")
        snapshot = Path(self.builds.image_dir(image.uri.rsplit("@", 1)[-1]))
        config_path = snapshot / ".image.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        workdir = config.get("workdir") or ""
        if workdir not in ("", "/"):
            self._rewrites[workdir.rstrip("/")] = str(snapshot)
        account = self.execution.template.service_account or compute_default_account(self.context.project)
        # The job's account is checked when the job is created or updated (actAs), not by RunJob, whose
        # caller needs only run.jobs.run (roles/run.invoker, https://cloud.google.com/run/docs/execute/
        # jobs). One deleted or disabled since cannot get access tokens (iam.py), which Cloud Run needs
        # to give a task its identity: the execution is accepted and fails before any task starts.
        # Google does not document this case in so many words; this is the nearest documented reading.
        if problem := self.access.unusable_account(account):
            raise RunFailure(
                f"The job's tasks run as service account {account}, but {problem}: no access token can be "
                "issued for it, so no task can start."
            )
        mounts = {mount.name: mount.mount_path for mount in container.volume_mounts}
        for volume in self.execution.template.volumes:
            if "gcs" in volume and volume.name in mounts:
                self._check_mount(volume, account)
                self._check_mount_owner(volume, mounts[volume.name], config.get("user") or "")
                bucket_dir = self.storage.bucket_dir(volume.gcs.bucket)
                bucket_dir.mkdir(parents=True, exist_ok=True)
                self._rewrites[mounts[volume.name].rstrip("/")] = str(bucket_dir)
                self.context.buckets.append(volume.gcs.bucket)
        self._rewrites = dict(sorted(self._rewrites.items(), key=lambda item: -len(item[0])))
        if container.command:
            argv = list(container.command) + list(container.args)
        else:
            argv = list(config.get("entrypoint") or []) + list(container.args or config.get("cmd") or [])
        if not argv:
            raise RunFailure(f"Image '{container.image}' has no entrypoint and the container no command.")
        argv = [self._rewrite(arg) for arg in argv]
        if re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(argv[0])):
            argv[0] = sys.executable
            if problem := local_python.check(argv, snapshot):
                raise RunFailure(problem)
        accelerator = self.execution.template.node_selector.accelerator
        if accelerator and _on_this_cpu(argv) != argv:
            argv = _on_this_cpu(argv)
            self.system(
                f"Emulated {accelerator}: the task runs on this machine's CPU (--device cpu).", "INFO"
            )
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(snapshot),
        }
        env |= {
            k: self._rewrite(v) for k, v in (config.get("env") or {}).items() if k not in ("PATH", "HOME")
        }
        for var in container.env:
            if "value_source" in var:
                env[var.name] = self._secret(var)
            else:
                env[var.name] = self._rewrite(var.value)
        self.metadata = MetadataServer(
            self.access, self.context.project, account, self.context.location
        ).start()
        env |= self.metadata.environment()
        # The jobs' variables of the container contract: a task's index (0 to CLOUD_RUN_TASK_COUNT - 1,
        # set per task in launch()) and attempt, which a task uses to pick its share of the work
        # (https://cloud.google.com/run/docs/container-contract#env-vars).
        env |= {
            "CLOUD_RUN_JOB": self.context.job,
            "CLOUD_RUN_EXECUTION": self.context.execution,
            "CLOUD_RUN_TASK_COUNT": str(self.execution.task_count),
            "STORAGE_EMULATOR_HOST": self.storage.base_url,
        }
        self._argv, self._env, self._cwd = argv, env, snapshot

    def _check_mount(self, volume: run_v2.Volume, account: str) -> None:
        """gcsfuse mounts as the job's service account: reading needs storage.objects.list and get,
        writing also create, delete and update (roles/storage.objectUser holds them all;
        https://cloud.google.com/storage/docs/cloud-storage-fuse/mount-bucket#required-roles). A denied
        mount fails the task before the container starts, with gcsfuse's own words
        (https://cloud.google.com/storage/docs/cloud-storage-fuse/troubleshooting)."""
        access = self.access
        bucket = volume.gcs.bucket
        needed = ["storage.objects.list", "storage.objects.get"]
        if not volume.gcs.read_only:
            needed += ["storage.objects.create", "storage.objects.delete", "storage.objects.update"]
        missing = [
            permission
            for permission in needed
            if not access.allowed(
                f"serviceAccount:{account}", permission, self.context.project, f"projects/_/buckets/{bucket}"
            )
        ]
        if missing:
            raise RunFailure(
                f"Failed to mount Cloud Storage volume '{volume.name}': mountWithArgs: mountWithConn: "
                f"fs.NewServer: create file system: SetUpBucket: OpenBucket: Bad credentials for bucket "
                f"{bucket}: permission denied ({account} lacks {', '.join(missing)} on gs://{bucket})."
            )

    @staticmethod
    def _check_mount_owner(volume: run_v2.Volume, path: str, user: str) -> None:
        """gcsfuse gives every file to the user who mounted it, 0644/0755, unless the uid/gid (or
        file-mode/dir-mode) options say otherwise (https://github.com/GoogleCloudPlatform/gcsfuse/blob/master/docs/semantics.md#permissions-and-ownership).
        An image whose USER is not root then cannot write to a writable mount without uid=<its uid>:
        Cloud Run would start the task and its first write would fail with EACCES; the emulator, which
        runs tasks as its own user, refuses at the start with that reason instead."""
        uid = user.split(":", 1)[0]
        if volume.gcs.read_only or uid in ("", "0", "root"):
            return
        options = {option.partition("=")[0]: option.partition("=")[2] for option in volume.gcs.mount_options}
        if options.get("uid") == uid or options.get("dir-mode", "").endswith("7"):
            return
        raise RunFailure(
            f"The container runs as user {user}, but the Cloud Storage volume '{volume.name}' at {path} is "
            "owned by root (0755 directories, 0644 files) without uid/gid mount options: every write there "
            f"fails with EACCES (permission denied). Add mount option uid={uid} (and gid) to the volume."
        )

    def stop_metadata(self) -> None:
        if self.metadata is not None:
            self.metadata.stop()
            self.metadata = None

    def _rewrite(self, value: str) -> str:
        if not self._rewrites:
            return value
        # One pass over all prefixes, longest first, so a replacement is never rewritten again; a prefix
        # counts only as a whole path component (/mnt/gcs/x and --out=/mnt/gcs, not /mnt/gcsx).
        prefixes = "|".join(re.escape(prefix) for prefix in self._rewrites)
        pattern = rf"(?<![\w./-])({prefixes})(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda match: self._rewrites[match[1]], value)

    def _secret(self, var: run_v2.EnvVar) -> str:
        ref = var.value_source.secret_key_ref
        try:
            value = self.secrets.resolve(
                secret_name(ref.secret, self.context.project),
                ref.version or "latest",
                project=self.context.project,
            )
        except ApiError as error:
            raise RunFailure(f"Secret {ref.secret} of env {var.name}: {error.message}") from error
        return value.decode() if isinstance(value, bytes) else str(value)

    def launch(self, index: int, attempt: int) -> Launch:
        home = self.data_dir / "run" / self.context.execution / f"task{index}"
        home.mkdir(parents=True, exist_ok=True)
        env = self._env | {
            "HOME": str(home),
            "CLOUD_RUN_TASK_INDEX": str(index),
            "CLOUD_RUN_TASK_ATTEMPT": str(attempt),
        }
        return Launch(self._argv, env, self._cwd)


def _on_this_cpu(argv: list[str]) -> list[str]:
    """argv with `--device cuda` (or --device=cuda) turned into cpu: the emulated GPU is this CPU."""
    result = list(argv)
    for index, arg in enumerate(result):
        if arg == "--device=cuda":
            result[index] = "--device=cpu"
        elif arg == "--device" and index + 1 < len(result) and result[index + 1] == "cuda":
            result[index + 1] = "cpu"
    return result
