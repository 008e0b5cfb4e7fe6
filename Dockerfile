# syntax=docker/dockerfile:1
# PersonaPlex server image: `personaplex serve` on port 8998 with an NVIDIA GPU.
#
#   docker compose up --build            (see docker-compose.yaml and .env.example)
#
# Everything installed comes from the distribution's and PyPI's package registries: Python packages
# are pinned with hashes in requirements.lock (regenerate it with the command written at its top).
# The PyPI torch wheels bring their own CUDA libraries; the CUDA base image supplies the rest of the
# NVIDIA container setup. Weights are not in the image: they download at first start into the
# /cache volume (Hugging Face cache), so the image stays small and the weights survive rebuilds.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/personaplex \
    PATH=/opt/personaplex/bin:$PATH \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/cache

# Ubuntu 24.04's Python is 3.12, the version requirements.lock is resolved for.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv "$VIRTUAL_ENV"
WORKDIR /app
COPY requirements.lock ./
RUN pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY personaplex ./personaplex
# The project itself, built with the pinned setuptools already installed (no build-time downloads).
RUN pip install --no-deps --no-build-isolation . && rm -rf /app/build

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin personaplex \
 && mkdir -p /cache \
 && chown personaplex:personaplex /cache
USER 10001:10001
WORKDIR /home/personaplex
VOLUME ["/cache"]
EXPOSE 8998

# The first start downloads ~17 GB of weights: allow it before counting failures.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8998/api/health', timeout=4).status != 200)"]

ENTRYPOINT ["personaplex"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8998"]
