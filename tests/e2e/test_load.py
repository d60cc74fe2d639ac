"""Eight simultaneous calls on one worker with eight slots, all served in real time."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.callstate import CallStore
from app.sim import CallOptions, run_call
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Stack, tail

CALLS = 8


@pytest.fixture(scope="module")
def short_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("speech8")
    raw, phone = tmp / "raw.wav", tmp / "caller.wav"
    text = "Hi, is my recycling collected this Thursday?"
    subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, timeout=60)
    subprocess.run(
        ["sox", str(raw), "-r", "8000", "-e", "u-law", str(phone), "pad", "0.5", "0"], check=True, timeout=60
    )
    return phone


@pytest.mark.asyncio
async def test_eight_simultaneous_calls_are_all_served_in_real_time(stack: Stack, short_speech: Path) -> None:
    options = CallOptions(
        audio=short_speech, gateway_url=stack.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN
    )
    reports = await asyncio.gather(*(run_call(options) for _ in range(CALLS)))
    why = f"\n--- gateway ---\n{tail(stack.gateway.log)}\n--- worker ---\n{tail(stack.worker.log)}"
    assert [r.status for r in reports] == ["completed"] * CALLS, [r.error for r in reports] + [why]
    assert len({r.call_id for r in reports}) == CALLS
    frames_in = sum(r.frames_in for r in reports)
    frames_out = sum(r.frames_out for r in reports)
    late = sum(r.late_frames for r in reports)
    summary = [(r.first_bot_audio_ms, r.late_frames, r.frames_in, r.duplex_fraction) for r in reports]
    # The simulator kept real time for all eight callers, so the figures below are the server's.
    assert sum(r.send_late_frames for r in reports) <= 0.01 * frames_out
    assert late / frames_in < 0.01, summary
    for report in reports:
        assert report.frames_in >= 0.9 * report.frames_out, summary
        # Eight calls share this 2-core box with their callers: one ~100 ms hiccup of a short call
        # costs 0.05 (measured 0.942 once); the strict >= 95 % criterion is test_call's, one call.
        assert report.duplex_fraction is not None and report.duplex_fraction >= 0.9, summary
        assert report.first_bot_audio_ms is not None and report.first_bot_audio_ms <= 1000, summary
    store = CallStore(aioredis.from_url(stack.redis_url, decode_responses=True))
    records = [await store.get_call(r.call_id) for r in reports]
    await store.redis.aclose()
    assert all(r is not None and r.worker_id == records[0].worker_id for r in records)
    assert len({r.slot for r in records}) == CALLS  # eight slots of one worker, at the same time
