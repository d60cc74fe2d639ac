# The gateway: Twilio webhooks and media streams, Pipecat pipelines, admin API (`callcenter gateway`).
# Build from the repository root:  docker build -f infra/docker/gateway.Dockerfile -t callcenter-gateway .
# No model here: the package without its `worker` extra (no torch, no weights tooling).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 \
 && rm -rf /var/lib/apt/lists/* \
 && pip install --upgrade pip

WORKDIR /app
COPY pyproject.toml ./
COPY app ./app
COPY personas ./personas
COPY infra/docker/gateway-entrypoint.sh /usr/local/bin/gateway-entrypoint
RUN pip install . && useradd --system --uid 10001 callcenter

USER callcenter
ENV GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8080 \
    PERSONAS_DIR=/app/personas
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"
ENTRYPOINT ["gateway-entrypoint"]
CMD ["callcenter", "gateway"]
