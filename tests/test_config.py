"""Settings come from the environment, validated, with safe defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import GatewaySettings, WorkerSettings


def test_worker_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("WORKER_PORT", "9191")
    monkeypatch.setenv("WORKER_MAX_SLOTS", "32")
    monkeypatch.setenv("WORKER_MODEL", str(tmp_path))
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = WorkerSettings(_env_file=None)
    assert settings.worker_port == 9191 and settings.worker_max_slots == 32
    assert settings.worker_model == str(tmp_path)
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.resolved_worker_url == "ws://127.0.0.1:9191"


def test_worker_model_must_be_tiny_hf_or_a_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("WORKER_MODEL", str(tmp_path / "missing"))
    with pytest.raises(ValidationError, match="WORKER_MODEL"):
        WorkerSettings(_env_file=None)


def test_gateway_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = GatewaySettings(_env_file=None)
    assert settings.gateway_port == 8080 and settings.twilio_auth_token is None
    monkeypatch.setenv("GATEWAY_PORT", "0")
    with pytest.raises(ValidationError):
        GatewaySettings(_env_file=None)


def test_twilio_media_chunk_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings(_env_file=None).twilio_media_chunk_ms == 20
    monkeypatch.setenv("TWILIO_MEDIA_CHUNK_MS", "40")
    assert GatewaySettings(_env_file=None).twilio_media_chunk_ms == 40
    for bad in ("30", "160", "0"):
        monkeypatch.setenv("TWILIO_MEDIA_CHUNK_MS", bad)
        with pytest.raises(ValidationError, match="TWILIO_MEDIA_CHUNK_MS must be"):
            GatewaySettings(_env_file=None)
