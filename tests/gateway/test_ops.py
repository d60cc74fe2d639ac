"""Health, readiness and Prometheus metrics of the gateway."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.callstate import CallStore
from tests.gateway.conftest import GatewayServer
from tests.gateway.twilio_fake import post_signed, voice_params
from tests.pipecat.fake_worker import FakeWorker

pytestmark = pytest.mark.asyncio


async def test_healthz_and_readyz_follow_redis_and_workers(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient, fake_worker: FakeWorker
) -> None:
    gateway = gateway_factory()
    assert (await http.get(f"{gateway.base}/healthz")).json() == {"status": "ok"}
    not_ready = await http.get(f"{gateway.base}/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["reason"] == "no live worker"
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=3)
    ready = await http.get(f"{gateway.base}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True, "redis": True, "live_workers": 1, "routable_workers": 1, "draining_workers": 0, "free_slots": 3
    }
    # A draining worker is alive but takes no new call: not ready for one.
    await store.heartbeat(fake_worker.worker_id, 0, url=fake_worker.url, max_slots=3, draining=True)
    draining = await http.get(f"{gateway.base}/readyz")
    assert draining.status_code == 503 and draining.json()["reason"] == "no routable worker"
    assert draining.json()["draining_workers"] == 1


async def test_metrics_count_calls_by_status(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    response = await post_signed(http, f"{gateway.base}/twilio/voice", voice_params("CA" + "2" * 32))
    assert response.status_code == 200  # no worker: busy
    metrics = await http.get(f"{gateway.base}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'gateway_calls_total{end_reason="busy",status="rejected"} 1.0' in text
    assert "gateway_active_calls 0.0" in text
    assert "gateway_frames_dropped_total 0.0" in text
    assert "gateway_pickup_seconds_bucket" in text
    assert 'gateway_twilio_requests_total{endpoint="voice",outcome="busy"} 1.0' in text
