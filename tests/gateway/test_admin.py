"""The admin API: bearer token, 401/404/503, records with events and transcript."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from app.callstate import CallStatus, CallStore, EndReason
from tests.gateway.conftest import GatewayServer

pytestmark = pytest.mark.asyncio

ADMIN = {"Authorization": "Bearer test-admin-token"}


async def test_admin_api_needs_the_bearer_token(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-admin-token"}):
        response = await http.get(f"{gateway.base}/api/calls", headers=headers)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
    assert (await http.get(f"{gateway.base}/api/calls/anything")).status_code == 401


async def test_admin_api_lists_and_shows_calls(
    gateway_factory: Callable[..., GatewayServer], store: CallStore, http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory()
    await store.create_call("c-old", channel="twilio", persona="general-assistant", from_number="+15550000001")
    await store.create_call("c-new", channel="twilio", persona="waste-management")
    await store.transition("c-new", CallStatus.CONNECTING)
    await store.transition("c-new", CallStatus.ACTIVE, worker_id="w1", slot=0, prefill_ms=3.0)
    await store.add_event("c-new", "text", text=" Hello")
    await store.add_event("c-new", "text", text=" there")
    await store.add_event("c-new", "dtmf", digit="1")
    await store.end_call("c-new", CallStatus.COMPLETED, EndReason.CALLER_HANGUP)

    listing = await http.get(f"{gateway.base}/api/calls", headers=ADMIN)
    assert listing.status_code == 200
    assert [c["call_id"] for c in listing.json()["calls"]] == ["c-new", "c-old"]
    active = await http.get(f"{gateway.base}/api/calls", params={"active": "true"}, headers=ADMIN)
    assert [c["call_id"] for c in active.json()["calls"]] == ["c-old"]

    detail = (await http.get(f"{gateway.base}/api/calls/c-new", headers=ADMIN)).json()
    assert detail["call"]["status"] == "completed" and detail["call"]["end_reason"] == "caller_hangup"
    assert detail["transcript"] == " Hello there"
    assert [e["type"] for e in detail["events"]] == ["status", "status", "status", "text", "text", "dtmf", "status"]
    missing = await http.get(f"{gateway.base}/api/calls/nope", headers=ADMIN)
    assert missing.status_code == 404


async def test_admin_api_is_disabled_without_admin_token(
    gateway_factory: Callable[..., GatewayServer], http: httpx.AsyncClient
) -> None:
    gateway = gateway_factory(admin_token=None)
    response = await http.get(f"{gateway.base}/api/calls", headers=ADMIN)
    assert response.status_code == 503
    assert "ADMIN_TOKEN" in response.json()["detail"]


async def test_admin_api_answers_503_with_a_clear_message_while_redis_is_unreachable(
    tmp_path, http: httpx.AsyncClient
) -> None:
    import asyncio
    import os
    import signal
    import time
    from pathlib import Path

    from app.callstate import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "db.rdb")
    gateway = GatewayServer(server.url).start()
    try:
        assert (await http.get(f"{gateway.base}/api/calls", headers=ADMIN)).status_code == 200
        os.kill(int(Path(server._server.pidfile).read_text().strip()), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.alive(timeout_s=0.2) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

        response = await http.get(f"{gateway.base}/api/calls", headers=ADMIN)
        assert response.status_code == 503
        assert response.json()["error"] == "call_state_unavailable"
        assert "Redis" in response.json()["message"] and "Traceback" not in response.text
        assert (await http.get(f"{gateway.base}/readyz")).status_code == 503

        await asyncio.to_thread(server.restart)
        assert (await http.get(f"{gateway.base}/api/calls", headers=ADMIN)).status_code == 200
    finally:
        gateway.stop()
        server.close()
