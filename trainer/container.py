"""What the container must give the trainer, checked before the model loads: a writable output directory,
what torch.compile needs at run time, and room in /dev/shm for the data-loader workers' batches.

Each check fails (or adapts) in seconds: on Cloud Run a problem found after the 27B load, the image
features and the baseline evaluation costs most of an hour per task attempt (docs/container.md).
"""

import logging
import os
import platform
import re
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import ProcessorMixin

from trainer import UserError

log = logging.getLogger(__name__)

GIB = 2**30
# Share of /dev/shm the workers' batches may fill; PyTorch's other shared tensors and the pin-memory
# thread's copies need the rest.
SHM_SHARE = 0.5
# Batches each worker prepares ahead: DataLoader's default prefetch_factor, which the trainer keeps.
PREFETCH_FACTOR = 2


def describe_platform() -> str:
    """torch and the CUDA it was built for, the host's driver and the GPU: the run's first log line."""
    try:
        driver = driver_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        driver = "none"
    gpu = "no GPU visible"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), NVIDIA driver {driver}, {gpu}, "
        f"Python {platform.python_version()}"
    )


def driver_version(proc_version: str) -> str:
    """The driver's version from /proc/driver/nvidia/version, whose first line differs between the
    proprietary module ("NVIDIA UNIX x86_64 Kernel Module  535.216.03 ...") and the open one ("NVIDIA UNIX
    Open Kernel Module for x86_64  580.159.04 ...")."""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", proc_version)
    return found.group(1) if found else "unknown"


def check_writable(run_dir: Path) -> None:
    """Create the run directory and write a file in it, before anything loads.

    A bucket mount the container's user cannot write would otherwise fail at the first checkpoint.
    """
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as error:
        raise UserError(
            f"cannot write to the output directory {run_dir}: {error.strerror or error}",
            f"give --output-dir a directory that this user (uid {os.getuid()}) can write; a Cloud Storage "
            "mount needs the uid and gid mount options of the image's user (gemma-launch sets them)",
        ) from None


def compile_toolchain_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """What Triton lacks to build its launcher at run time (torch.compile on CUDA), or None.

    Triton 3.7 (runtime/build.py) compiles a small C module with $CC, else gcc, else clang from PATH,
    against the Python headers, and links the host driver's libcuda.so.1, found through
    TRITON_LIBCUDA_PATH, `ldconfig -p` or LD_LIBRARY_PATH (backends/nvidia/driver.py). The same build is
    tried here on a one-line module, so a missing linker or C library shows up too.
    """
    path = environ.get("PATH", "")
    if "CC" in environ:
        compiler = shutil.which(environ["CC"], path=path)
        if compiler is None:
            return f"CC is {environ['CC']!r}, which is not an executable C compiler"
    else:
        compiler = shutil.which("gcc", path=path) or shutil.which("clang", path=path)
        if compiler is None:
            return "no C compiler: CC is not set and neither gcc nor clang is on PATH"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not (Path(include) / "Python.h").is_file():
        return f"no Python headers: {include}/Python.h does not exist"
    with tempfile.TemporaryDirectory() as build:
        source = Path(build) / "probe.c"
        source.write_text("#include <Python.h>\nint probe(void) { return Py_IsInitialized(); }\n")
        command = [compiler, str(source), "-shared", "-fPIC", f"-I{include}", "-o", f"{build}/probe.so"]
        result = subprocess.run(command, env=dict(environ), capture_output=True, text=True)
        if result.returncode != 0:
            said = (result.stderr.strip().splitlines() or ["no message"])[-1]
            return f"{compiler} cannot build a Python extension: {said}"
    if not libcuda_dirs(environ):
        return "the host driver's libcuda.so.1 is not visible (ldconfig -p, LD_LIBRARY_PATH)"
    return None


def libcuda_dirs(environ: Mapping[str, str]) -> list[str]:
    """The directories holding libcuda.so.1, searched as Triton searches them."""
    if environ.get("TRITON_LIBCUDA_PATH"):
        dirs = [environ["TRITON_LIBCUDA_PATH"]]
    else:
        try:
            listing = subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout
        except OSError:
            listing = ""
        dirs = [os.path.dirname(line.split()[-1]) for line in listing.splitlines() if "libcuda.so.1" in line]
        dirs = dirs or environ.get("LD_LIBRARY_PATH", "").split(":")
    return [directory for directory in dirs if directory and (Path(directory) / "libcuda.so.1").exists()]


class SharedMemory:
    """/dev/shm as measured at start, and the data-loader workers whose batches fit in it.

    Workers hand their batches to the trainer through shared memory, PREFETCH_FACTOR batches each; when
    /dev/shm (which Cloud Run sizes itself, and where it allows no volume) is too small for them, the first
    batch dies with "Bus error". Fewer workers, or none (images decoded in the main process), fit.
    """

    def __init__(self, free: int) -> None:
        self.free = free

    @classmethod
    def measure(cls, path: str = "/dev/shm") -> "SharedMemory":
        try:
            free = shutil.disk_usage(path).free
        except OSError:  # no /dev/shm: workers could not share batches at all
            free = 0
        log.info("%s: %.2f GiB free for data-loader batches", path, free / GIB)
        return cls(free)

    def workers(self, wanted: int, batch_bytes: int, purpose: str) -> int:
        """At most `wanted` workers whose prefetched batches take at most SHM_SHARE of the free space."""
        fitting = min(wanted, int(self.free * SHM_SHARE) // max(PREFETCH_FACTOR * batch_bytes, 1))
        if fitting < wanted:
            log.warning(
                "/dev/shm has %.2f GiB free: %d data-loader workers instead of %d for %s (%d batches of "
                "%.0f MiB in flight per worker)",
                self.free / GIB,
                fitting,
                wanted,
                purpose,
                PREFETCH_FACTOR,
                batch_bytes / 2**20,
            )
        return fitting


def pixel_bytes(processor: ProcessorMixin) -> int:
    """Bytes of one image's pixel values as the processor prepares them: float32, 3 channels."""
    size = processor.image_processor.size
    return 4 * 3 * size["height"] * size["width"]
