"""Crashes with real processes, and what they must not leave behind.

- kill -9 of the gateway with 3 live calls, then start it again: within 30 s no record is left
  open (failed/gateway_lost) and no worker slot stays reserved; calls are taken again.
- kill -9 of the embedded Redis under `callcenter up` 2 s after a call completed: `up` starts it
  again, /readyz says not ready meanwhile, no record is lost, and the next call completes; a call
  live during the crash goes on and its record is complete afterwards.
- kill -9 of `up` itself: its children go down with it, the next `up` keeps every record.
- 4 callers at once on 2 free slots: the 2 beyond capacity hear the busy message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from app.callstate import TERMINAL, CallStatus, CallStore, EndReason
from app.sim import CallOptions, run_call
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Proc, base_env, free_port, running_stack, tail
from tests.e2e.test_startup import _start_up

pytestmark = pytest.mark.asyncio(loop_scope="function")

REAP_WITHIN_S = 30.0


def _options(gateway_url: str, audio: Path, **overrides) -> CallOptions:
    return CallOptions(
        audio=audio, gateway_url=gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
        to_number="+15550100001", **overrides,
    )


async def _wait(predicate, timeout_s: float, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every_s)


async def test_a_killed_gateway_leaves_no_open_record_and_no_reserved_slot(
    redis_url: str, speech_wav: Path, tmp_path: Path
) -> None:
    w_port, g_port = free_port(), free_port()
    gateway_url = f"http://127.0.0.1:{g_port}"
    env = base_env(tmp_path, redis_url) | {
        "WORKER_HOST": "127.0.0.1", "WORKER_PORT": str(w_port), "WORKER_ID": "e2e-crash-worker",
        "WORKER_MAX_SLOTS": "4", "GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(g_port),
        "PUBLIC_URL": gateway_url,
    }
    worker = Proc.start("worker", ["worker"], env, tmp_path, tmp_path / "worker.log")
    gateway = Proc.start("gateway", ["gateway"], env, tmp_path, tmp_path / "gateway-1.log")
    again: Proc | None = None
    store = CallStore(aioredis.from_url(redis_url, decode_responses=True))
    try:
        worker.wait_http(f"http://127.0.0.1:{w_port}/healthz")
        gateway.wait_http(f"{gateway_url}/readyz")
        calls = [asyncio.create_task(run_call(_options(gateway_url, speech_wav))) for _ in range(3)]

        async def three_active():
            records = [r for r in await store.list_calls(active_only=True) if r.status == CallStatus.ACTIVE]
            return records if len(records) == 3 else None

        live = await _wait(three_active, 30)
        assert live, tail(tmp_path / "gateway-1.log")
        gateway.process.send_signal(signal.SIGKILL)
        gateway.process.wait(timeout=10)
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=60)

        again = Proc.start("gateway", ["gateway"], env, tmp_path, tmp_path / "gateway-2.log")
        again.wait_http(f"{gateway_url}/healthz")

        async def all_ended():
            records = [await store.get_call(r.call_id) for r in live]
            return records if all(r.status in TERMINAL for r in records) else None

        ended = await _wait(all_ended, REAP_WITHIN_S)
        took = time.monotonic() - killed_at
        why = f"\n{tail(tmp_path / 'gateway-2.log')}"
        assert ended, ([(r.call_id, r.status) for r in [await store.get_call(x.call_id) for x in live]], why)
        assert took <= REAP_WITHIN_S, (took, why)
        assert {(r.status, r.end_reason) for r in ended} == {(CallStatus.FAILED, EndReason.GATEWAY_LOST)}, why
        assert await store.list_calls(active_only=True) == []

        async def slots_free():
            (info,) = [w for w in await store.workers() if w.worker_id == "e2e-crash-worker"]
            return info.reserved == 0 and info.active == 0

        assert await _wait(slots_free, 15), await store.workers()
        # The restarted gateway takes calls again, on the slots the dead one held.
        report = await asyncio.wait_for(run_call(_options(gateway_url, speech_wav)), timeout=60)
        assert report.status == "completed", f"{report.error}{why}"
    finally:
        for proc in (again, gateway, worker):
            if proc is not None:
                proc.stop()
        await store.redis.aclose()


def _redis_pid(db: Path) -> int:
    """The pid of the embedded redis-server serving `db` (asked through its socket)."""
    from redis import Redis

    socket_path = (db.parent / f"{db.name}.socket").read_text().strip()
    client = Redis(unix_socket_path=socket_path)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


async def test_kill_9_of_the_embedded_redis_under_up_loses_no_record(speech_wav: Path, tmp_path: Path) -> None:
    process, log, gateway_url = _start_up(tmp_path)
    db = tmp_path / "redis" / "db.rdb"
    try:
        first = await asyncio.wait_for(run_call(_options(gateway_url, speech_wav)), timeout=60)
        assert first.status == "completed", f"{first.error}\n{tail(log)}"
        assert first.record is not None and first.record.get("status") == "completed"
        await asyncio.sleep(2.0)
        os.kill(_redis_pid(db), signal.SIGKILL)

        not_ready = False
        async with httpx.AsyncClient(timeout=2) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    ready = (await http.get(f"{gateway_url}/readyz")).status_code == 200
                except httpx.HTTPError:
                    ready = False
                not_ready = not_ready or not ready
                if not_ready and ready:
                    break
                await asyncio.sleep(0.05)
        assert not_ready and ready, tail(log)
        deadline = time.monotonic() + 10
        while "embedded redis is back" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        text = log.read_text(errors="replace")
        assert "embedded redis is not answering" in text and "embedded redis is back" in text, tail(log)  # not ready while Redis was gone, ready again after
        assert process.poll() is None

        socket_path = (db.parent / f"{db.name}.socket").read_text().strip()
        store = CallStore(aioredis.from_url(f"unix://{socket_path}", decode_responses=True))
        try:
            record = await store.get_call(first.call_id or "")
            assert record is not None and record.status == CallStatus.COMPLETED, record
            assert record.frames_in is not None and record.frames_in > 0
            assert "completed" in [e.get("to") for e in await store.events(record.call_id)]
        finally:
            await store.redis.aclose()
        second = await asyncio.wait_for(run_call(_options(gateway_url, speech_wav)), timeout=60)
        assert second.status == "completed", f"{second.error}\n{tail(log)}"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


async def test_a_live_call_goes_on_through_a_redis_crash_and_its_record_is_complete_afterwards(
    speech_wav: Path, tmp_path: Path
) -> None:
    """kill -9 of the embedded Redis mid-call under `up`: the caller keeps hearing the bot (no gap
    over a second), the call completes, and once Redis is back its record is complete: status,
    frames and the bot's text, all written from the gateway's queue."""
    process, log, gateway_url = _start_up(tmp_path)
    db = tmp_path / "redis" / "db.rdb"
    try:
        call = asyncio.create_task(run_call(_options(gateway_url, speech_wav, tail_silence_s=2.0)))
        socket_path = (db.parent / f"{db.name}.socket").read_text().strip()
        store = CallStore(aioredis.from_url(f"unix://{socket_path}", decode_responses=True))
        try:
            async def active():
                return [r for r in await store.list_calls(active_only=True) if r.status == CallStatus.ACTIVE]

            assert await _wait(active, 30), tail(log)
            await asyncio.sleep(1.0)
            os.kill(_redis_pid(db), signal.SIGKILL)  # mid-call
            report = await asyncio.wait_for(call, timeout=90)
            assert report.status == "completed", f"{report.error}\n{tail(log)}"
            assert report.largest_gap_ms <= 1000, (report.largest_gap_ms, tail(log))

            async def ended():
                record = await store.get_call(report.call_id or "")
                return record if record is not None and record.status in TERMINAL else None

            record = await _wait(ended, 30)
            assert record is not None, tail(log)
            assert (record.status, record.end_reason) == (CallStatus.COMPLETED, EndReason.CALLER_HANGUP)
            assert record.frames_in and record.frames_in > 50
            walk = [e["to"] for e in await store.events(record.call_id) if e["type"] == "status"]
            assert walk == ["ringing", "connecting", "active", "completed"]
            assert await store.list_calls(active_only=True) == []
        finally:
            await store.redis.aclose()
        text = (tmp_path / "up.log").read_text(errors="replace")
        assert "embedded redis is back" in text
        assert text.count("Traceback") == 0, tail(log, 80)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


async def test_kill_9_of_up_takes_its_children_down_and_the_next_up_keeps_every_record(
    speech_wav: Path, tmp_path: Path
) -> None:
    """`up` killed by SIGKILL: its gateway and worker do not linger holding their ports; the Redis
    it leaves is taken over (saving its data) by the next `up` on the same files."""
    from tests.e2e.test_startup import _pids

    process, log, gateway_url = _start_up(tmp_path)
    again = None
    try:
        report = await asyncio.wait_for(run_call(_options(gateway_url, speech_wav)), timeout=60)
        assert report.status == "completed", f"{report.error}\n{tail(log)}"
        children = _pids(log)
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 40
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert not any(_alive(pid) for pid in children.values()), children

        again, log2, gateway2 = _start_up(tmp_path / "again", db_dir=tmp_path)
        db = tmp_path / "redis" / "db.rdb"
        socket_path = (db.parent / f"{db.name}.socket").read_text().strip()
        store = CallStore(aioredis.from_url(f"unix://{socket_path}", decode_responses=True))
        try:
            record = await store.get_call(report.call_id or "")
            assert record is not None and record.status == CallStatus.COMPLETED, tail(log2)
        finally:
            await store.redis.aclose()
        assert "stopped the server an earlier run left" in log2.read_text(errors="replace"), tail(log2)
        second = await asyncio.wait_for(run_call(_options(gateway2, speech_wav)), timeout=60)
        assert second.status == "completed", f"{second.error}\n{tail(log2)}"
    finally:
        for proc in (process, again):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=60)


async def test_callers_beyond_capacity_at_the_same_instant_hear_the_busy_message_real_processes(
    redis_url: str, speech_wav: Path, tmp_path: Path
) -> None:
    """4 callers at once on a worker with 2 slots: 2 talk to the bot, 2 hear the busy message and
    the overflow number; no `<Connect>` then silence."""
    with running_stack(redis_url, tmp_path, WORKER_MAX_SLOTS="2", WORKER_ID="e2e-two-slots",
                       OVERFLOW_NUMBER="+15550100999") as stack:
        reports = await asyncio.wait_for(
            asyncio.gather(*(run_call(_options(stack.gateway_url, speech_wav)) for _ in range(4))), timeout=90
        )
        why = f"{[(r.status, r.error) for r in reports]}\n{tail(stack.gateway.log)}"
        assert sorted(r.status for r in reports) == ["completed", "completed", "rejected", "rejected"], why
        store = CallStore(aioredis.from_url(redis_url, decode_responses=True))
        try:
            for report in reports:
                record = await store.get_call(report.call_id or report.call_sid)
                if report.status == "rejected":
                    assert report.twiml_verbs == ["Say", "Dial"], report.twiml_verbs
                    assert record is not None and (record.status, record.end_reason) == ("rejected", "busy")
                else:
                    assert record is not None and record.status == "completed"
        finally:
            await store.redis.aclose()
