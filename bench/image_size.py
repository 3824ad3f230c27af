"""The image's size, estimated from requirements.lock as PyPI publishes it, and the libraries it ships twice.

For each pinned package the wheel the image installs (the one whose sha256 the lock lists, for CPython 3.12
on Linux x86_64 with glibc 2.36, as in python:3.12-slim-bookworm) is looked up in PyPI's JSON API. Its
download size comes from there; its unpacked size is the sum of the sizes its zip directory lists, read
with HTTP range requests (the central directory only, not the wheel). Bytecode (the Dockerfile's
UV_COMPILE_BYTECODE) is estimated from the .py sources at BYTECODE_RATIO.

Every shared library (.so) of every wheel is listed by name without its version: a name found in two
wheels is a library the image holds twice.

    python bench/image_size.py                                # requirements.lock, the image's base
    python bench/image_size.py --lock OLD.lock --base cuda    # another lock on the old CUDA base
    python bench/image_size.py --json sizes.json              # also every wheel's figures
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import urllib.parse
import urllib.request
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packaging import tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/pypi/{name}/json"
MB = 1e6

# The image's interpreter and platform: CPython 3.12, glibc 2.36 (Debian bookworm), x86_64.
GLIBC = (2, 36)
PLATFORMS = [f"manylinux_{GLIBC[0]}_{minor}_x86_64" for minor in range(GLIBC[1], 4, -1)]
PLATFORMS += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"]
SUPPORTED = list(tags.cpython_tags((3, 12), ["cp312", "abi3", "none"], PLATFORMS))
SUPPORTED += list(tags.compatible_tags((3, 12), "cp312", PLATFORMS))
RANK = {tag: index for index, tag in enumerate(SUPPORTED)}

# .pyc bytes per .py byte: `compileall` (CPython 3.11, on the development machine) of transformers 5.25.0,
# torch._inductor and scipy: 84.8 MB of .py gave 104.8 MB of .pyc. The Dockerfile compiles every module.
BYTECODE_RATIO = 1.24

# What the image adds besides its wheels, with where each figure comes from. `compressed` is what a pull
# transfers (gzip layers), `unpacked` what lands on disk.
BASES = {
    "slim": {
        "name": "python:3.12-slim-bookworm + gcc, libc6-dev (this Dockerfile)",
        # What the Dockerfile deletes after the install: Triton's copy of CUPTI, which nvidia-cuda-cupti
        # also ships.
        "removed": ("triton/backends/nvidia/lib/cupti/",),
        "layers": [
            {
                "what": "python:3.12-slim-bookworm, linux/amd64",
                "compressed": 45_437_565,
                "unpacked": 124.3 * MB,
                # Compressed: the tag's amd64 manifest; unpacked: the image's "Virtual Size".
                "source": "docker-library/repo-info, repos/python/remote/3.12-slim-bookworm.md at "
                "33a22f41ac7bf613bc03380b0317536a9a7fb5e8 and repos/python/local/3.12-slim-bookworm.md at "
                "33cda30be5833831143d1c93663f1ca38d85d049",
            },
            {
                "what": "gcc and libc6-dev with their dependencies, Debian bookworm",
                # The 32 packages they add to the base: gcc-12 (68.2 MB), cpp-12 (33.8), binutils and
                # its libraries (29.3), libgcc-12-dev (14.3), libc6-dev (12.0), the sanitizer runtimes
                # (21.4), linux-libc-dev (7.1), ...: their Installed-Size fields sum to 192.2 MiB.
                "compressed": None,
                "unpacked": 192.2 * 2**20,
                "source": "apt-cache show on Debian bookworm (Installed-Size of each package)",
            },
        ],
    },
    "cuda": {
        "name": "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 + uv's CPython 3.12 (the Dockerfile before)",
        "layers": [
            {
                "what": "ubuntu:24.04, linux/amd64",
                "compressed": None,
                "unpacked": 78.14 * MB,
                "source": "docker-library/repo-info, repos/ubuntu/local/24.04.md at "
                "e31f5d5b827fad85f66dbe93c3a36a5ff8359e5e (Virtual Size)",
            },
            {
                "what": "the CUDA 12.8 libraries and cuDNN 9 of the runtime image, sized as the PyPI wheels "
                "of the same releases (CUDA_BASE_WHEELS; cuda-compat-12-8 not counted)",
                "compressed": None,
                "unpacked": None,  # measured
                "source": "NVIDIA's dist/12.8.1/ubuntu2404/{base,runtime,runtime/cudnn}/Dockerfile "
                "(gitlab.com/nvidia/container-images/cuda); wheel sizes from PyPI",
            },
            {
                "what": "CPython 3.12 installed by uv (python-build-standalone)",
                "compressed": None,
                "unpacked": 0.1e9,
                "source": "estimate, not measured: no registry or uv download reachable here",
            },
        ],
    },
}

# The apt packages NVIDIA's 12.8.1 runtime and cuDNN images install (cuda-cudart; cuda-libraries-12-8:
# cuBLAS, cuFFT, cuFile, cuRAND, cuSOLVER, cuSPARSE, NPP, nvJitLink, nvJPEG, nvFatbin, NVRTC, OpenCL;
# cuda-nvtx, libnccl2, libcudnn9-cuda-12) hold the same shared libraries as these PyPI wheels: the CUDA
# 12.8 update 1 releases (the versions torch 2.10's CUDA 12.8 build pins, where it pins them), NCCL 2.25.1
# and cuDNN 9.8.0.87 of the image's time (the latter as a Dockerfile derived from 12.8.1's sets
# NV_CUDNN_VERSION). Adjacent releases differ by a few percent in size.
CUDA_BASE_WHEELS = {
    "nvidia-cuda-runtime-cu12": "12.8.90",
    "nvidia-cublas-cu12": "12.8.4.1",
    "nvidia-cufft-cu12": "11.3.3.83",
    "nvidia-cufile-cu12": "1.13.1.3",
    "nvidia-curand-cu12": "10.3.9.90",
    "nvidia-cusolver-cu12": "11.7.3.90",
    "nvidia-cusparse-cu12": "12.5.8.93",
    "nvidia-npp-cu12": "12.3.3.100",
    "nvidia-nvjitlink-cu12": "12.8.93",
    "nvidia-nvjpeg-cu12": "12.3.5.92",
    "nvidia-nvfatbin-cu12": "12.8.90",
    "nvidia-cuda-opencl-cu12": "12.8.90",
    "nvidia-cuda-nvrtc-cu12": "12.8.93",
    "nvidia-nvtx-cu12": "12.8.90",
    "nvidia-nccl-cu12": "2.25.1",
    "nvidia-cudnn-cu12": "9.8.0.87",
}


@dataclass
class Wheel:
    name: str
    version: str
    filename: str
    compressed: int
    unpacked: int
    sources: int  # bytes of .py files
    # Shared libraries by name without version (libcublas.so.13 -> libcublas): their unpacked bytes.
    libraries: dict[str, int] = field(default_factory=dict)


class RangeFile(io.RawIOBase):
    """A remote file read with HTTP range requests: enough for zipfile to read a wheel's directory."""

    def __init__(self, url: str, size: int) -> None:
        self.url, self.size, self.position = url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def readinto(self, buffer) -> int:
        end = min(self.position + len(buffer), self.size)
        if end <= self.position:
            return 0
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.position}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def locked(path: Path) -> list[tuple[str, str, set[str]]]:
    """(name, version, sha256 hashes) of every pin in a `uv pip compile --generate-hashes` file."""
    pins = []
    for block in re.split(r"\n(?=\S)", path.read_text()):
        match = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", block)
        if match:
            pins.append((match[1], match[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))))
    return pins


def library_name(path: str) -> str | None:
    """libcublas.so.13 -> libcublas; None for files that are not shared libraries."""
    base = path.rsplit("/", 1)[-1]
    if ".so" not in base or base.endswith((".py", ".pyi")):
        return None
    if ".cpython-" in base or ".abi3" in base:  # Python extension modules belong to their package
        return None
    # auditwheel's vendored copies carry a hash: numpy.libs/libgfortran-040039e1.so.5.0.0 -> libgfortran.
    return re.sub(r"-[0-9a-f]{8}$", "", base.split(".so")[0])


def same_version(published: str, pinned: str) -> bool:
    try:
        return Version(published) == Version(pinned)
    except InvalidVersion:  # old releases with versions PEP 440 does not parse
        return False


def wheel_of(name: str, version: str, hashes: set[str], removed: tuple[str, ...] = ()) -> Wheel:
    """The wheel of a pin that the image installs, without the files under `removed`."""
    url = PYPI.format(name=canonicalize_name(name))
    with urllib.request.urlopen(url, timeout=120) as response:
        releases = json.load(response)["releases"]
    # PyPI keys releases by the version as uploaded: 13.0.3.0 may be listed as 13.0.3.
    files = releases.get(version) or next(
        files for key, files in releases.items() if same_version(key, version)
    )
    candidates = []
    for info in files:
        if not info["filename"].endswith(".whl") or (hashes and info["digests"]["sha256"] not in hashes):
            continue
        ranks = [RANK[tag] for tag in parse_wheel_filename(info["filename"])[3] if tag in RANK]
        if ranks:
            candidates.append((min(ranks), info))
    if not candidates:
        raise SystemExit(f"{name}=={version}: no wheel for CPython 3.12 on manylinux x86_64 in PyPI")
    info = min(candidates, key=lambda candidate: candidate[0])[1]
    remote = RangeFile(urllib.parse.urljoin(url, info["url"]), info["size"])
    with zipfile.ZipFile(io.BufferedReader(remote, buffer_size=1 << 20)) as archive:
        entries = [entry for entry in archive.infolist() if not entry.filename.startswith(removed)]
    libraries: dict[str, int] = defaultdict(int)
    for entry in entries:
        if library := library_name(entry.filename):
            libraries[library] += entry.file_size
    return Wheel(
        name=canonicalize_name(name),
        version=version,
        filename=info["filename"],
        compressed=info["size"],
        unpacked=sum(entry.file_size for entry in entries),
        sources=sum(entry.file_size for entry in entries if entry.filename.endswith(".py")),
        libraries=dict(sorted(libraries.items())),
    )


def measure(pins: list[tuple[str, str, set[str]]], removed: tuple[str, ...] = ()) -> list[Wheel]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda pin: wheel_of(*pin, removed), pins))


def twice(wheels: list[Wheel], base_wheels: list[Wheel]) -> dict[str, dict[str, int]]:
    """Shared library name -> {where: bytes of its copy}, for names found more than once."""
    owners: dict[str, dict[str, int]] = defaultdict(dict)
    for where, wheel in [(w.name, w) for w in wheels] + [(f"CUDA base ({w.name})", w) for w in base_wheels]:
        for library, size in wheel.libraries.items():
            owners[library][where] = size
    return {library: copies for library, copies in sorted(owners.items()) if len(copies) > 1}


def gb(size: float | None) -> str:
    return "?" if size is None else f"{size / 1e9:.2f} GB"


def report(wheels: list[Wheel], base: str, base_wheels: list[Wheel], top: int) -> dict:
    layers = [dict(layer) for layer in BASES[base]["layers"]]
    for layer in layers:
        if layer["unpacked"] is None:  # the CUDA base's libraries
            layer["unpacked"] = sum(wheel.unpacked for wheel in base_wheels)
            layer["compressed"] = sum(wheel.compressed for wheel in base_wheels)
    compressed = sum(wheel.compressed for wheel in wheels)
    unpacked = sum(wheel.unpacked for wheel in wheels)
    bytecode = BYTECODE_RATIO * sum(wheel.sources for wheel in wheels)
    total = unpacked + bytecode + sum(layer["unpacked"] for layer in layers)
    cuda = [
        wheel for wheel in wheels if wheel.name.startswith(("nvidia-", "cuda-")) or wheel.name == "triton"
    ]

    print(f"Base: {BASES[base]['name']}")
    for layer in layers:
        print(f"  {gb(layer['unpacked']):>9} unpacked  {layer['what']}  [{layer['source']}]")
    print(f"\n{len(wheels)} wheels: {gb(compressed)} to download, {gb(unpacked)} unpacked")
    print(
        f"  of which torch {gb(next((w.unpacked for w in wheels if w.name == 'torch'), 0))}, CUDA "
        f"wheels and triton {gb(sum(w.unpacked for w in cuda))}"
    )
    print(f"  bytecode (.pyc, {BYTECODE_RATIO} x {gb(bytecode / BYTECODE_RATIO)} of .py): {gb(bytecode)}")
    print(f"\n{'wheel':<48} {'download':>10} {'unpacked':>10}")
    for wheel in sorted(wheels, key=lambda wheel: -wheel.unpacked)[:top]:
        print(f"{wheel.name + '==' + wheel.version:<48} {gb(wheel.compressed):>10} {gb(wheel.unpacked):>10}")
    duplicates = twice(wheels, base_wheels)
    # Every copy but the largest is one too many.
    spare = sum(sum(copies.values()) - max(copies.values()) for copies in duplicates.values())
    print(f"\nShared libraries found more than once: {len(duplicates)}, {gb(spare)} in extra copies")
    for library, copies in duplicates.items():
        print(f"  {library}: " + ", ".join(f"{owner} {size / MB:.1f} MB" for owner, size in copies.items()))
    print(f"\nImage, unpacked: {gb(total)}")
    return {
        "base": base,
        "layers": layers,
        "wheels": [asdict(wheel) for wheel in wheels],
        "base_wheels": [asdict(wheel) for wheel in base_wheels],
        "wheels_compressed": compressed,
        "wheels_unpacked": unpacked,
        "bytecode": bytecode,
        "twice": duplicates,
        "twice_bytes": spare,
        "image_unpacked": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--base", choices=sorted(BASES), default="slim")
    parser.add_argument("--top", type=int, default=15, help="largest wheels to list")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    wheels = measure(locked(args.lock), BASES[args.base].get("removed", ()))
    base_wheels = measure([(n, v, set()) for n, v in CUDA_BASE_WHEELS.items()]) if args.base == "cuda" else []
    figures = report(wheels, args.base, base_wheels, args.top)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
