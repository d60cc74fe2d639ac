"""The delay the server adds to a call, through real processes (tiny model on CPU): a 300 ms stall
of the worker delays the frames caught in it, and a second later the call is back to its delay of
before (no ratchet: queued frames are caught up, the playout re-syncs)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.sim import CallOptions, run_call
from app.sim.audio import PHONE_RATE, read_caller_audio, write_wav
from app.sim.latency import LatencySnapshot, scrape_latency, window
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Stack, counter, running_stack, tail

STALL_S = 0.3
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def latency_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(redis_url, tmp_path_factory.mktemp("latency"), WORKER_MAX_SLOTS="2") as running:
        yield running


@pytest.fixture(scope="module")
def long_speech(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The espeak caller twice over (~12 s, its pauses included)."""
    pcm = read_caller_audio(speech_wav)
    path = tmp_path_factory.mktemp("long-speech") / "caller.wav"
    write_wav(path, np.concatenate([pcm, pcm]))
    return path


async def snapshot_at(http: httpx.AsyncClient, stack: Stack, when: float) -> LatencySnapshot:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return await scrape_latency(http, stack.gateway_url)


@pytest.mark.asyncio
async def test_after_a_300_ms_worker_stall_the_added_delay_is_back_to_its_baseline_within_a_second(
    latency_stack: Stack, long_speech: Path
) -> None:
    stack = latency_stack
    seconds = len(read_caller_audio(long_speech)) / PHONE_RATE
    options = CallOptions(
        audio=long_speech, gateway_url=stack.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
        timeout_s=30.0,
    )
    async with httpx.AsyncClient(timeout=5.0) as http:
        catch_ups_before = await counter(http, stack.worker_url, "worker_tick_catch_ups")
        start = await scrape_latency(http, stack.gateway_url)
        call = asyncio.create_task(run_call(options))
        deadline = time.monotonic() + 10.0
        while (await scrape_latency(http, stack.gateway_url))["total"].count <= start["total"].count:
            assert time.monotonic() < deadline and not call.done(), "no bot frame was played within 10 s"
            await asyncio.sleep(0.05)
        first = time.monotonic()  # the call's first frame was just played
        # baseline: 2.5-4.5 s into the call (the gateway aligns its framing in its first 2 s)
        base_from = await snapshot_at(http, stack, first + 2.5)
        overruns = [await counter(http, stack.worker_url, "worker_tick_overruns")]
        base_to = await snapshot_at(http, stack, first + 4.5)
        overruns.append(await counter(http, stack.worker_url, "worker_tick_overruns"))
        os.kill(stack.worker.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(STALL_S)
        finally:
            os.kill(stack.worker.process.pid, signal.SIGCONT)
        resumed = time.monotonic()
        after_1s = await snapshot_at(http, stack, resumed + 1.0)
        overruns.append(await counter(http, stack.worker_url, "worker_tick_overruns"))
        end = await snapshot_at(http, stack, resumed + 4.0)
        overruns.append(await counter(http, stack.worker_url, "worker_tick_overruns"))
        assert resumed + 4.0 < first + seconds - 1.0, "the call is too short for its windows"
        report = await call
        catch_ups = await counter(http, stack.worker_url, "worker_tick_catch_ups") - catch_ups_before

    why = f"\n--- gateway ---\n{tail(stack.gateway.log)}\n--- worker ---\n{tail(stack.worker.log)}"
    assert report.status == "completed", (report.error, why)
    windows = {
        "baseline": window(base_to, base_from),
        "stall": window(after_1s, base_to),
        "recovered": window(end, after_1s),
    }
    summary = {name: {seg: h.summary_ms() for seg, h in w.items()} for name, w in windows.items()}
    logger.info("added latency per window and segment: %s", summary)
    baseline, stall, recovered = (windows[name]["total"] for name in ("baseline", "stall", "recovered"))
    assert baseline.count >= 20 and recovered.count >= 30, summary  # 25 and 37 frames in real time
    # A comparison of delays needs a worker that keeps real time outside the stall: on a box so
    # loaded that the tiny model overruns its 80 ms tick again and again, neither window is a baseline.
    busy = {"baseline": overruns[1] - overruns[0], "recovered": overruns[3] - overruns[2]}
    if busy["baseline"] > 3 or busy["recovered"] > 4:
        pytest.skip(f"this box did not run the worker in real time (tick overruns {busy} in 25 and 37 ticks): {summary}")
    # The stall happened and delayed the frames caught in it (by more than any baseline frame)...
    assert stall.max_bound() is not None and stall.max_bound() >= 0.2 > baseline.quantile(0.95), summary
    assert catch_ups >= 1, summary  # the worker ran its queued frames at once, off its grid
    # ...and a second after it the call's delay is its baseline again: nothing stays queued.
    # A frame left standing would add a whole tick (80 ms) to every later frame: p50 shows it.
    # Measured on this 2-core box: recovered p50 -4 to +17 ms from the baseline's over 12 runs
    # (what is left is at most half a 20 ms output chunk, and this box's jitter).
    assert recovered.quantile(0.5) <= baseline.quantile(0.5) + 0.035, summary
    # The tail: the pacer's standing frame after the restart goes at its second or third lead
    # report (4 frames each) and a pause to cut in (<= 0.3 s); on a box that slows the worker's
    # catch-up it can still reach into the first frames of this window (p95 +71 ms in 1 of 8 runs,
    # -5 to +34 in the others); a queue that stays was +240 ms.
    assert recovered.quantile(0.95) <= baseline.quantile(0.95) + 0.100, summary
