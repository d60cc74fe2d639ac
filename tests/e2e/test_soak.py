"""Soak: 8 concurrent callers churning for a while, hostile messages and streams mixed in, on real
processes (gateway, worker with the tiny model, Redis). Afterwards every record is terminal and
says what happened, no worker slot is held, and the gateway's and worker's file descriptors and
memory are flat.

Bounded: SOAK_SECONDS (default 60; 120 in CI, as .ci/run runs with CI=true). Longer by setting it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.callstate import TERMINAL, CallStatus, CallStore, EndReason
from app.sim import CallOptions, run_call
from app.sim.call import RawMessage
from app.sim.report import CallReport
from app.sim.twilio import sign
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Stack, bad_messages, running_stack, tail
from tests.gateway.twilio_fake import MediaStream

pytestmark = pytest.mark.asyncio(loop_scope="function")

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "120" if os.environ.get("CI") else "60"))
CALLERS = 8
FD_GROWTH = 8  # descriptors a process may hold beyond its warm baseline (pools, caches)
RSS_GROWTH_MB = 50.0

# What a hostile or broken Twilio side can send mid-call: each is refused and counted, never fatal.
HOSTILE = [
    "not json {",
    json.dumps({"event": "nonsense", "streamSid": "MZx"}),
    "[" * 5000,
    json.dumps({"event": "media", "media": {"payload": "A" * 4000}}),  # 3 KB of μ-law in one 20 ms message
    json.dumps({"event": "media", "media": {"payload": "%%% not base64 %%%"}}),
    json.dumps({"event": "media", "media": {"payload": 5}}),
    json.dumps({"event": "start", "start": {"streamSid": "MZother"}}),
    json.dumps({"event": "mark"}),
    json.dumps({"event": "dtmf", "dtmf": {"digit": ["1"]}}),
    "x" * 20_000,  # over the gateway's per-message bound: refused before parsing
]


@pytest.fixture(scope="module")
def short_speech(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("soak") / "caller-2s.wav"
    subprocess.run(["sox", str(speech_wav), str(path), "trim", "0", "2.5"], check=True, timeout=60)
    return path


def _usage(pid: int) -> tuple[int, float]:
    """(open file descriptors, RSS in MB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return fds, int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def _one_call(stack: Stack, audio: Path, rng: random.Random) -> tuple[str, CallReport]:
    """A call with a random hang-up, number, length and hostile messages mixed in."""
    hangup = rng.choices(["stop", "close", "drop"], weights=[6, 1, 1])[0]
    raw = tuple(RawMessage(at_s=rng.uniform(0.3, 2.5), data=rng.choice(HOSTILE)) for _ in range(rng.randint(0, 3)))
    options = CallOptions(
        audio=audio, gateway_url=stack.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
        to_number=rng.choice(["+15550100001", "+15550100002", "+15559999999"]), hangup=hangup,
        raw_messages=raw, tail_silence_s=rng.uniform(0.2, 1.0), timeout_s=20.0,
    )
    return hangup, await asyncio.wait_for(run_call(options), timeout=60)


async def _caller(stack: Stack, audio: Path, rng: random.Random, until: float, reports: list) -> None:
    """One line: call after call until `until`."""
    while time.monotonic() < until:
        reports.append(await _one_call(stack, audio, rng))


async def _intruder(stack: Stack, rng: random.Random, until: float, refused: list[int]) -> None:
    """Signed stream upgrades for calls no webhook made (or with a wrong token): every one refused."""
    url = stack.gateway_url.replace("http://", "ws://") + "/twilio/stream"
    while time.monotonic() < until:
        sid = "CA" + "%032x" % rng.getrandbits(128)
        stream = await MediaStream.open(url, call_sid=sid, signature=sign(TWILIO_TOKEN, url))  # a valid signature
        await stream.start({"call_id": sid, "persona": "general-assistant", "token": "y" * 43})
        refused.append(await stream.closed_with(timeout=10.0) or 0)
        await asyncio.sleep(rng.uniform(0.5, 2.0))


def _check(hangup: str, report: CallReport, record: dict | None) -> str | None:
    """Why this call's outcome is wrong, or None."""
    if report.status == "rejected":  # all 8 slots were taken for a moment: said busy, rejected
        return None if record and (record["status"], record["end_reason"]) == ("rejected", "busy") else "busy?"
    if record is None:
        return f"no record ({report.status}: {report.error})"
    if record["status"] not in {s.value for s in TERMINAL}:
        return f"record left {record['status']}"
    outcome = (record["status"], record.get("end_reason"))
    if hangup == "stop":
        ok = report.status == "completed" and outcome == ("completed", "caller_hangup")
        return None if ok else f"stop -> {report.status}/{outcome}: {report.error}"
    allowed = {("completed", "caller_hangup"), ("failed", "error")}  # a vanished stream, or Twilio's status first
    return None if outcome in allowed else f"{hangup} -> {outcome}"


async def test_eight_callers_churning_with_hostile_messages_leave_every_record_right_and_nothing_behind(
    redis_url: str, short_speech: Path, tmp_path: Path
) -> None:
    rng = random.Random(20261202)
    with running_stack(redis_url, tmp_path) as stack:
        store = CallStore(aioredis.from_url(redis_url, decode_responses=True))
        try:
            pids = {"gateway": stack.gateway.process.pid, "worker": stack.worker.process.pid}
            # One round each first: pools, caches and persona states warm before the baseline.
            await asyncio.gather(*(_one_call(stack, short_speech, random.Random(i)) for i in range(CALLERS)))
            await asyncio.sleep(2.0)
            baseline = {name: _usage(pid) for name, pid in pids.items()}
            bad_before = await bad_messages(stack.gateway_url)

            until = time.monotonic() + SOAK_SECONDS
            reports: list = []
            refused: list[int] = []
            await asyncio.gather(
                *(_caller(stack, short_speech, random.Random(rng.random()), until, reports) for _ in range(CALLERS)),
                _intruder(stack, random.Random(7), until, refused),
            )
            why = f"\n--- gateway ---\n{tail(stack.gateway.log, 60)}\n--- worker ---\n{tail(stack.worker.log, 30)}"
            assert len(reports) >= CALLERS * 2, (len(reports), why)

            async def settled():  # every record terminal, every slot back
                if await store.list_calls(active_only=True):
                    return False
                return all(w.reserved == 0 for w in await store.workers())

            deadline = time.monotonic() + 20
            while not await settled() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert await store.list_calls(active_only=True) == [], why
            assert [w.reserved for w in await store.workers()] == [0], why

            wrong = []
            for hangup, report in reports:
                record = await store.get_call(report.call_id) if report.call_id else None
                problem = _check(hangup, report, record.model_dump(mode="json") if record else None)
                if problem:
                    wrong.append((report.call_id, problem))
            assert wrong == [], (wrong[:10], why)
            stopped = [r for h, r in reports if h == "stop" and r.status == "completed"]
            assert stopped and max(r.largest_gap_ms for r in stopped) < 2000, why
            assert refused and set(refused) == {1008}, refused
            sent = sum(r.raw_messages_sent for _, r in reports)
            assert sent > 0 and await bad_messages(stack.gateway_url) - bad_before >= sent, (sent, why)

            await asyncio.sleep(2.0)
            for name, pid in pids.items():
                fds, rss = _usage(pid)
                fds0, rss0 = baseline[name]
                assert fds <= fds0 + FD_GROWTH, (name, fds0, fds, why)
                assert rss <= rss0 + RSS_GROWTH_MB, (name, rss0, rss, why)
            records = [await store.get_call(r.call_id) for _, r in reports if r.call_id]
            completed = sum(1 for r in records if r and r.status == CallStatus.COMPLETED)
            assert completed >= len(stopped)
            assert all(r.end_reason != EndReason.GATEWAY_LOST for r in records if r)
        finally:
            await store.redis.aclose()
