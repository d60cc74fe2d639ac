"""docker-compose.yml, the Dockerfiles and Prometheus config hang together (no Docker engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _compose_cli() -> list[str] | None:
    """`docker compose` (v2 plugin) if present, else the standalone `docker-compose`."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid_for_the_compose_cli() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TWILIO_", "ADMIN_", "PUBLIC_", "HF_"))}
    result = subprocess.run([*cli, "config", "-q"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr


def test_services_healthchecks_and_dependencies() -> None:
    services = _compose()["services"]
    assert set(services) == {"redis", "worker", "gateway", "prometheus"}
    redis = services["redis"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("worker", "gateway"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/healthz" in test
        assert services[name]["environment"]["REDIS_URL"].startswith("redis://redis:6379")
    assert services["gateway"]["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "worker": {"condition": "service_healthy"},
    }
    assert services["gateway"]["ports"] == ["8080:8080"]
    for key in ("PUBLIC_URL", "TWILIO_AUTH_TOKEN", "ADMIN_TOKEN"):
        assert key in services["gateway"]["environment"]
    volumes = _compose()["volumes"]
    assert "redis-data" in volumes and "weights" in volumes


def test_worker_reserves_a_gpu_and_loads_the_official_weights() -> None:
    worker = _compose()["services"]["worker"]
    device = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    env = worker["environment"]
    assert env["WORKER_MODEL"] == "hf" and "HF_TOKEN" in env
    assert any(v.startswith("weights:") for v in worker["volumes"])
    assert env["WORKER_TOKEN"] == _compose()["services"]["gateway"]["environment"]["WORKER_TOKEN"]


def test_prometheus_scrapes_gateway_and_worker() -> None:
    services = _compose()["services"]
    mount = services["prometheus"]["volumes"][0].split(":")[0]
    config = yaml.safe_load((ROOT / mount).read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"gateway": ["gateway:8080"], "worker": ["worker:8090"]}
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


@pytest.mark.parametrize("name", ["worker", "gateway"])
def test_dockerfiles_copy_what_exists_and_run_the_cli(name: str) -> None:
    service = _compose()["services"][name]
    dockerfile = ROOT / service["build"]["dockerfile"]
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY\s+(\S+)\s+\S+$", text, flags=re.M):
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"
    assert f'CMD ["callcenter", "{name}"]' in text
    installs = re.findall(r"pip install (\S+)", text)
    if name == "worker":
        assert text.lstrip().startswith("#") and "FROM ${CUDA_IMAGE}" in text and "nvidia/cuda" in text
        assert '".[worker]"' in installs  # the model's dependencies
    else:
        assert "FROM python:3.11-slim" in text
        assert "." in installs and "torch" not in text.replace("no torch", "")  # the gateway carries no model


def test_gateway_entrypoint_refuses_to_run_open(tmp_path: Path) -> None:
    script = ROOT / "infra/docker/gateway-entrypoint.sh"
    env = {"PATH": os.environ["PATH"]}
    refused = subprocess.run([str(script), "true"], env=env, capture_output=True, text=True, timeout=10)
    assert refused.returncode == 2
    assert "PUBLIC_URL" in refused.stderr and "TWILIO_AUTH_TOKEN" in refused.stderr
    env |= {"PUBLIC_URL": "https://x", "TWILIO_AUTH_TOKEN": "t", "ADMIN_TOKEN": "a"}
    assert subprocess.run([str(script), "true"], env=env, timeout=10).returncode == 0


def _seconds(text: str) -> float:
    """A compose duration such as '45s', '1m30s' or '90' in seconds."""
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", str(text))
    for value, unit in parts:
        total += float(value) * units.get(unit or "s", 1)
    return total


def test_the_worker_gets_time_to_drain_before_docker_kills_it() -> None:
    """`docker compose stop` (SIGTERM) lets the worker move its calls off: grace + uvicorn's 10 s fit."""
    from app.config import WorkerSettings

    worker = _compose()["services"]["worker"]
    drain = float(worker["environment"].get("WORKER_DRAIN_GRACE_S", WorkerSettings().worker_drain_grace_s))
    assert _seconds(worker["stop_grace_period"]) >= drain + 10
