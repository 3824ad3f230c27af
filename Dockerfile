# The project's image. The Cloud Run GPU job runs python -m trainer [flags] (docs/trainer.md); the
# staging job runs python -m launcher.stage_worker from the same image (launcher/staging.py).
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# CUDA 12.8: the first release with Blackwell (RTX PRO 6000) kernels in the torch cu128 wheels.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

COPY --from=uv /uv /usr/local/bin/uv

# The model cache lives in /tmp: Cloud Run's only writable place besides mounted volumes.
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1

RUN uv venv --python 3.12 /opt/venv \
    && groupadd --gid 10001 trainer \
    && useradd --create-home --uid 10001 --gid 10001 trainer

WORKDIR /app

# Dependencies before code, so a code change rebuilds only the last layers.
COPY pyproject.toml ./
RUN uv pip install --torch-backend cu128 -r pyproject.toml --extra train "bitsandbytes==0.50.2"

COPY README.md ./
COPY launcher/ launcher/
COPY trainer/ trainer/
RUN uv pip install --no-deps .

USER 10001:10001
ENTRYPOINT ["python", "-m", "trainer"]
