"""A call longer than the worker's (small, configured) context, through real processes.

The worker runs with WORKER_CONTEXT=200 frames (16 s) and a 10-frame margin: the default persona's
prompt is ~130 frames, so a call rebuilds its context after ~5 s and every ~2 s after that. The
caller speaks (espeak-ng) through the real Twilio protocol for 14 s; the call completes like any
other, and the worker's /metrics count the rebuilds, none forced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from prometheus_client.parser import text_string_to_metric_families

from app.sim import CallOptions, run_call
from tests.e2e.conftest import ADMIN_TOKEN, TWILIO_TOKEN, Stack, running_stack, tail

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture(scope="module")
def long_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        redis_url, tmp_path_factory.mktemp("long-stack"), WORKER_MAX_SLOTS="2", WORKER_CONTEXT="200",
        WORKER_REBUILD_MARGIN_FRAMES="10", WORKER_REBUILD_CHUNK_FRAMES="8",
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def speech_14s(speech_wav: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The caller's speech twice over, padded with pauses: 14 s of a caller at 8 kHz μ-law."""
    audio, rate = sf.read(speech_wav, dtype="int16")
    pause = np.zeros(rate, dtype=np.int16)
    long = np.concatenate([audio, pause, audio, pause, audio])[: 14 * rate]
    path = tmp_path_factory.mktemp("speech14") / "caller-14s.wav"
    sf.write(path, long, rate, subtype="PCM_16")
    return path


def _rebuilds(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "worker_context_rebuilds":
            return {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}
    return {}


async def test_a_call_longer_than_the_context_completes_with_its_rebuilds_counted(
    long_stack: Stack, speech_14s: Path
) -> None:
    report = await run_call(CallOptions(
        audio=speech_14s, gateway_url=long_stack.gateway_url, auth_token=TWILIO_TOKEN, admin_token=ADMIN_TOKEN,
    ))
    why = f"\n--- gateway ---\n{tail(long_stack.gateway.log)}\n--- worker ---\n{tail(long_stack.worker.log)}"
    assert report.status == "completed", f"{report.error}{why}"
    assert report.frames_in >= 0.9 * report.frames_out, why  # the bot answered all along
    assert report.late_fraction is not None and report.late_fraction < 0.05, why
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{long_stack.worker_url}/metrics")).text
    rebuilds = _rebuilds(metrics)
    assert rebuilds.get("spread", 0) >= 3, f"{rebuilds}{why}"  # 14 s of call in a 16 s window
    assert rebuilds.get("forced", 0) == 0, why
    assert "context rebuilt" in long_stack.worker.log.read_text()
