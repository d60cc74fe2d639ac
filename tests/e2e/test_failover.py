"""Calls outliving their worker, with real processes: a gateway, two workers (tiny model), Redis,
and the caller speaking Twilio's protocol (`app.sim`, what `callcenter call` runs).

- kill -9 the worker serving a call: the call resumes on the other worker (its history travels in
  Start.resume), the caller's largest gap stays <= 1 s, the record stays active and completes,
  and a `worker_changed` event names both workers.
- SIGTERM a worker with two live calls: it drains, both calls move to the other worker and complete.
- A killed idle worker gets no new call: the next calls go to the live worker, with no failover.

Worker "a" has more slots than "b", so routing (most free slots) sends calls to "a" first.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from app.callstate import CallRecord, CallStore
from app.sim import CallOptions, run_call
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Proc, base_env, free_port, tail

pytestmark = pytest.mark.asyncio(loop_scope="function")

MAX_GAP_MS = 1000.0
SLOTS = {"a": 8, "b": 4}


class Cluster:
    """Redis (the module's), two workers that can be killed and started again, one gateway."""

    def __init__(self, redis_url: str, tmp: Path) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        g_port = free_port()
        self.gateway_url = f"http://127.0.0.1:{g_port}"
        self.env = base_env(tmp, redis_url) | {
            "WORKER_HOST": "127.0.0.1",
            "WORKER_STATE_DIR": str(tmp / "worker-state"),  # one tiny checkpoint and persona cache for both
            "WORKER_HEARTBEAT_S": "0.5",  # a missed beat shows within 2 s
            "WORKER_DRAIN_GRACE_S": "20",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(g_port),
            "PUBLIC_URL": self.gateway_url,
            "WORKER_FAILOVER_TIMEOUT_S": "5",
            "WORKER_HEARTBEAT_CHECK_S": "0.5",
        }
        self.ports = {name: free_port() for name in SLOTS}
        self.workers: dict[str, Proc] = {}
        self.starts = {name: 0 for name in SLOTS}
        self.gateway: Proc | None = None

    def worker_id(self, name: str) -> str:
        return f"e2e-{name}"

    def name_of(self, worker_id: str) -> str:
        return worker_id.removeprefix("e2e-")

    def http(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def start_worker(self, name: str) -> None:
        self.starts[name] += 1
        env = self.env | {
            "WORKER_PORT": str(self.ports[name]),
            "WORKER_ID": self.worker_id(name),
            "WORKER_MAX_SLOTS": str(SLOTS[name]),
        }
        log = self.tmp / f"worker-{name}-{self.starts[name]}.log"
        self.workers[name] = Proc.start(f"worker-{name}", ["worker"], env, self.tmp, log)
        self.workers[name].wait_http(f"{self.http(name)}/healthz")

    def ensure_up(self) -> None:
        """Both workers running and registered (restarting any a test killed)."""
        for name in SLOTS:
            proc = self.workers.get(name)
            if proc is None or proc.process.poll() is not None:
                self.start_worker(name)
        if self.gateway is None:
            self.gateway = Proc.start("gateway", ["gateway"], self.env, self.tmp, self.tmp / "gateway.log")
            self.gateway.wait_http(f"{self.gateway_url}/healthz")
        self.gateway.wait_http(f"{self.gateway_url}/readyz")

    def kill(self, name: str) -> None:
        """kill -9: no drain, no goodbye, the registration left behind."""
        proc = self.workers[name]
        proc.process.send_signal(signal.SIGKILL)
        proc.process.wait(timeout=10)

    def why(self) -> str:
        parts = [f"--- gateway ---\n{tail(self.tmp / 'gateway.log', 60)}"]
        for name, proc in self.workers.items():
            parts.append(f"--- worker {name} ---\n{tail(proc.log, 30)}")
        return "\n" + "\n".join(parts)

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for proc in self.workers.values():
            proc.stop()


@pytest.fixture(scope="module")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = Cluster(redis_url, tmp_path_factory.mktemp("cluster"))
    try:
        running.ensure_up()
        yield running
    finally:
        running.stop()


def _options(cluster: Cluster, audio: Path) -> CallOptions:
    return CallOptions(
        audio=audio, gateway_url=cluster.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
        to_number="+15550100001",
    )


async def _active_calls(store: CallStore, count: int, timeout_s: float = 20.0) -> list[CallRecord]:
    """The `count` active calls once each has its worker (the simulated callers have picked up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = [r for r in await store.list_calls(active_only=True) if r.status == "active" and r.worker_id]
        if len(records) >= count or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)


async def _ended(store: CallStore, call_id: str, timeout_s: float = 15.0) -> CallRecord | None:
    deadline = time.monotonic() + timeout_s
    while True:
        record = await store.get_call(call_id)
        if (record is not None and record.ended_at is not None) or time.monotonic() > deadline:
            return record
        await asyncio.sleep(0.1)


async def _changes(store: CallStore, call_id: str) -> list[dict[str, str]]:
    return [e for e in await store.events(call_id) if e["type"] == "worker_changed"]


async def test_killing_the_serving_worker_moves_the_call_with_a_short_gap(
    cluster: Cluster, speech_wav: Path
) -> None:
    cluster.ensure_up()
    store = CallStore(aioredis.from_url(cluster.redis_url, decode_responses=True))
    try:
        call = asyncio.create_task(run_call(_options(cluster, speech_wav)))
        active = await _active_calls(store, 1)
        assert len(active) == 1, cluster.why()
        victim = cluster.name_of(active[0].worker_id or "")
        survivor = next(name for name in SLOTS if name != victim)
        await asyncio.sleep(1.5)  # mid-call: the caller is talking, the bot answering
        cluster.kill(victim)
        report = await asyncio.wait_for(call, timeout=60)
        why = f"{report.error}{cluster.why()}"
        assert report.status == "completed", why
        assert report.largest_gap_ms <= MAX_GAP_MS, (report.largest_gap_ms, why)
        assert report.frames_in >= 0.8 * report.frames_out, why  # the bot kept talking all the call long
        record = await _ended(store, report.call_id or "")
        assert record is not None and (record.status, record.end_reason) == ("completed", "caller_hangup"), why
        assert record.worker_id == cluster.worker_id(survivor) and record.worker_changes == 1, why
        walk = [e["to"] for e in await store.events(record.call_id) if e["type"] == "status"]
        assert walk == ["ringing", "connecting", "active", "completed"]  # active through the move
        (changed,) = await _changes(store, record.call_id)
        moved = (changed["old_worker"], changed["new_worker"])
        assert moved == (cluster.worker_id(victim), cluster.worker_id(survivor)), changed
        assert changed["reason"] == "connection_lost" and float(changed["gap_ms"]) <= MAX_GAP_MS, changed
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"{cluster.gateway_url}/metrics")).text
        assert 'gateway_worker_changes_total{reason="connection_lost"} 1.0' in metrics
    finally:
        await store.redis.aclose()


async def test_sigterm_drains_a_worker_with_two_live_calls_and_both_complete(
    cluster: Cluster, speech_wav: Path
) -> None:
    cluster.ensure_up()
    store = CallStore(aioredis.from_url(cluster.redis_url, decode_responses=True))
    try:
        calls = [asyncio.create_task(run_call(_options(cluster, speech_wav))) for _ in range(2)]
        active = await _active_calls(store, 2)
        assert len(active) == 2 and {r.worker_id for r in active} == {cluster.worker_id("a")}, cluster.why()
        await asyncio.sleep(1.5)
        drained = cluster.workers["a"]
        drained.process.send_signal(signal.SIGTERM)
        reports = await asyncio.wait_for(asyncio.gather(*calls), timeout=90)
        why = f"{[r.error for r in reports]}{cluster.why()}"
        assert [r.status for r in reports] == ["completed", "completed"], why
        assert max(r.largest_gap_ms for r in reports) <= MAX_GAP_MS, ([r.largest_gap_ms for r in reports], why)
        for report in reports:
            record = await _ended(store, report.call_id or "")
            assert record is not None and (record.status, record.end_reason) == ("completed", "caller_hangup"), why
            assert record.worker_id == cluster.worker_id("b"), why
            (changed,) = await _changes(store, record.call_id)
            assert (changed["old_worker"], changed["new_worker"], changed["reason"]) == (
                cluster.worker_id("a"), cluster.worker_id("b"), "draining",
            )
        # No call left on it: the drained worker exits by itself, cleanly, and leaves the registry.
        assert await asyncio.to_thread(drained.process.wait, 30) == 0, tail(drained.log)
        assert "drained" in drained.log.read_text(errors="replace")
        assert cluster.worker_id("a") not in [w.worker_id for w in await store.workers()]
    finally:
        await store.redis.aclose()


async def test_a_killed_idle_worker_never_gets_a_new_call(cluster: Cluster, speech_wav: Path, tmp_path: Path) -> None:
    cluster.ensure_up()
    store = CallStore(aioredis.from_url(cluster.redis_url, decode_responses=True))
    try:
        cluster.kill("a")  # idle, and the one routing prefers (more free slots); its heartbeat still looks fresh
        for _ in range(2):  # at once, and again once its heartbeat has lapsed
            report = await asyncio.wait_for(run_call(_options(cluster, speech_wav)), timeout=60)
            why = f"{report.error}{cluster.why()}"
            assert report.status == "completed", why
            record = await _ended(store, report.call_id or "")
            assert record is not None and record.status == "completed" and record.worker_id == cluster.worker_id("b")
            assert record.worker_changes is None and not await _changes(store, record.call_id), why
            assert report.first_bot_audio_ms is not None and report.first_bot_audio_ms <= 2000, why
        (info,) = [w for w in await store.workers() if w.worker_id == cluster.worker_id("a")]
        assert not info.routable
        # Started again, it registers afresh and takes calls again.
        cluster.ensure_up()
        report = await asyncio.wait_for(run_call(_options(cluster, speech_wav)), timeout=60)
        record = await _ended(store, report.call_id or "")
        assert record is not None and record.worker_id == cluster.worker_id("a"), cluster.why()
    finally:
        await store.redis.aclose()
