# The GPU worker: PersonaPlex inference for many calls at once (`callcenter worker`).
# Build from the repository root:  docker build -f infra/docker/worker.Dockerfile -t callcenter-worker .
# torch wheels from PyPI bring their own CUDA libraries; the base image supplies the driver glue.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv libsndfile1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

# The heavy layer first, so code changes do not reinstall torch.
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /app
COPY pyproject.toml ./
COPY app ./app
COPY personas ./personas
RUN pip install ".[worker]" \
 && useradd --system --uid 10001 --home /data callcenter \
 && mkdir -p /data/hf /data/worker \
 && chown -R callcenter /data

USER callcenter
ENV WORKER_HOST=0.0.0.0 \
    WORKER_PORT=8090 \
    WORKER_MODEL=hf \
    WORKER_STATE_DIR=/data/worker \
    HF_HOME=/data/hf \
    PERSONAS_DIR=/app/personas
EXPOSE 8090
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=5 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8090/healthz', timeout=3)"
CMD ["callcenter", "worker"]
