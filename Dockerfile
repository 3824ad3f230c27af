# The project's image, for Cloud Run's NVIDIA RTX PRO 6000 (driver 580, CUDA 13.0). Not for its L4: driver
# 535 runs CUDA 12 at most, and no torch >= 2.13 for CUDA 12 is on PyPI (docs/container.md). The GPU job
# runs python -m trainer [flags] (docs/trainer.md); the staging job runs python -m launcher.staging.worker.
#
# Base images are pinned by digest, the tag kept beside it; a digest must be the tag's as published
# (docs/container.md says where each was). Docker uses the digest and ignores the tag.
# uv 0.13.0: the newest uv tag whose digest we found published, pinned with its tag in
# github.com/pkhanpara/cinnamon/blob/d4c934356893be14ef6448daa9c5e44794bcc392/Dockerfile (kept current by
# Dependabot) and in other public Dockerfiles, the same pair in each. `make lock` may run a newer uv: the
# lock is a plain hashed requirements file that any uv installs.
FROM ghcr.io/astral-sh/uv:0.13.0@sha256:cdc6093146eb3ff6a40107b38f008b789e050e77ad87865e381d9917da55a168 AS uv

# No CUDA base image: the lock's torch brings the CUDA 13 libraries as nvidia-* wheels, and Cloud Run mounts
# the driver's libcuda. Debian bookworm's glibc 2.36 runs the lock's manylinux_2_28 wheels, and this
# Python has its headers. python:3.12-slim-bookworm as of 2026-08-25 (Python 3.12.14), its index digest in
# github.com/docker-library/repo-info/blob/33a22f41ac7bf613bc03380b0317536a9a7fb5e8/repos/python/remote/3.12-slim-bookworm.md
FROM python:3.12-slim-bookworm@sha256:0f5b26b9518d002b6173fd61daad821fa340635ebfec5bba471013f9ca114579

COPY --from=uv /uv /usr/local/bin/uv

# torch.compile's Triton builds a small C launcher at run time with the host C compiler (gcc, its linker
# and the C library's headers), Python.h and the driver's libcuda.so.1; the trainer checks all three
# before loading the model (trainer/container.py). Debian's archive keeps only the current version of a
# package, so a pinned version would stop building; the base image's tag fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# Cloud Run's only writable places are in memory (/tmp and the rest of the container's filesystem) and the
# mounted bucket: HOME and every cache go to /tmp, which uid 10001 can write. Left to their defaults, Triton
# (~/.triton: its cache, dumps and overrides), Inductor (/tmp/torchinductor_<user>), the CUDA driver's JIT
# cache (~/.nv/ComputeCache), the Hub and matplotlib would each pick a place by user.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_HOME=/tmp \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_CACHE_PATH=/tmp/nv/ComputeCache \
    PYTHONUNBUFFERED=1

RUN uv venv --python /usr/local/bin/python3.12 /opt/venv \
    && groupadd --gid 10001 trainer \
    && useradd --no-create-home --home-dir /tmp --uid 10001 --gid 10001 trainer

WORKDIR /app

# Dependencies before code, so a code change rebuilds only the last layers. The lock pins every package
# with its hashes (make lock); nothing is resolved at build time. Triton's wheel carries its own CUPTI
# (134 MB, static libraries included) for its Proton profiler, which the trainer never runs;
# nvidia-cuda-cupti ships the same libraries for torch. Removed in the same layer, so no library is in the
# image twice (docs/benchmarks.md, "Image size"); neither libtriton.so nor libproton.so links it.
COPY requirements.lock ./
RUN uv pip install --require-hashes --no-deps -r requirements.lock \
    && rm -r /opt/venv/lib/python3.12/site-packages/triton/backends/nvidia/lib/cupti

COPY pyproject.toml README.md ./
COPY launcher/ launcher/
COPY trainer/ trainer/
RUN uv pip install --no-deps .

USER 10001:10001
ENTRYPOINT ["python", "-m", "trainer"]
