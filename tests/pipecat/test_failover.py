"""PersonaPlexService moving a call between (fake) workers: lost connections, Move, heartbeats, bounds.

The pipeline runs at 24 kHz (the model's rate: no resampling), and every caller frame is a
constant block whose value is its number, so the echoing fake's bot audio shows exactly which
caller frames the caller heard back, in which order, and whether any was heard twice.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from pipecat.frames.frames import ErrorFrame, Frame, InputAudioRawFrame, SpeechOutputAudioRawFrame, TTSTextFrame
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from app import protocol
from app.callstate import CallStore
from app.gateway.routing import RedisRouter
from app.pipecat.service import PersonaPlexService, WorkerChange
from app.pipecat.tape import CallTape
from tests.pipecat.fake_worker import DEFAULT_SEED, TOKEN, FakeWorker, frame_token

PARAMS = PipelineParams(audio_in_sample_rate=protocol.SAMPLE_RATE, audio_out_sample_rate=protocol.SAMPLE_RATE)


def numbered_frames(count: int) -> list[Frame]:
    """`count` caller frames of 80 ms at 24 kHz, frame k all samples 10 * (k + 1), in real time."""
    frames: list[Frame] = [SleepFrame(0.3)]
    for k in range(count):
        pcm = np.full(protocol.FRAME_SAMPLES, 10 * (k + 1), dtype="<i2").tobytes()
        frames += [InputAudioRawFrame(audio=pcm, sample_rate=protocol.SAMPLE_RATE, num_channels=1), SleepFrame(0.08)]
    return [*frames, SleepFrame(0.6)]


def heard(down: list[Frame]) -> list[int]:
    """The caller frame number of every bot frame pushed downstream, in order."""
    out = []
    for frame in down:
        if isinstance(frame, SpeechOutputAudioRawFrame):
            values = np.frombuffer(frame.audio, dtype="<i2")
            out.append(int(values[0]) // 10 - 1)
    return out


@pytest.fixture
async def workers():
    started: list[FakeWorker] = []

    async def make(**knobs) -> FakeWorker:
        worker = FakeWorker(**knobs)
        await worker.start()
        started.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in started:
            await worker.stop()


def service(store: CallStore, call_id: str, **kwargs) -> PersonaPlexService:
    kwargs.setdefault("failover_timeout_s", 3.0)
    return PersonaPlexService(
        call_id=call_id, persona="general-assistant", worker_token=TOKEN,
        router=RedisRouter(store, suspect_s=30), **kwargs,
    )


def changes_of(svc: PersonaPlexService) -> list[WorkerChange]:
    changes: list[WorkerChange] = []

    @svc.event_handler("on_worker_changed")
    async def _changed(_service, change: WorkerChange) -> None:
        changes.append(change)

    return changes


async def test_a_lost_worker_hands_the_call_to_another_with_its_history(store: CallStore, workers) -> None:
    a = await workers(worker_id="fake-a", drop_after=12)
    b = await workers(worker_id="fake-b")
    await store.register_worker("fake-a", a.url, max_slots=2)  # the most free slots: the call starts here
    await store.register_worker("fake-b", b.url, max_slots=1)
    svc = service(store, "call-lost")
    changes = changes_of(svc)
    down, up = await run_test(svc, frames_to_send=numbered_frames(30), pipeline_params=PARAMS)

    assert not [f for f in up if isinstance(f, ErrorFrame)] and svc.end_reason is None
    # fake-a answered caller frames 0..10 and died on frame 11: complete frames 0..9 are known.
    assert len(a.sessions[0].frames) == 12
    (start,) = b.starts
    assert start.call_id == "call-lost" and start.persona == "general-assistant"
    assert start.sampling.seed == DEFAULT_SEED  # the seed the call samples with, from fake-a's Ready
    assert start.resume is not None and start.resume.next_frame == 10
    tokens = start.resume.tokens()
    assert tokens.shape == (10, protocol.TOKENS_PER_FRAME)
    assert [int(t) for t in tokens[:, 0]] == [frame_token(i) for i in range(10)] and (tokens == tokens[:, :1]).all()
    # Warm-up audio: the caller frames just before the resume point; then frame 10 onward again.
    warm = start.resume.warm_pcm()
    assert warm.tobytes() == b"".join(a.sessions[0].frames[:10])
    assert b.sessions[0].frames[:2] == a.sessions[0].frames[10:12]
    # The caller heard every bot frame once, in order; only the frames around the loss are missing.
    numbers = heard(down)
    assert numbers == sorted(set(numbers)), numbers
    assert numbers[:11] == list(range(11)) and numbers[-1] == 29 and len(numbers) >= 25, numbers
    assert svc.stats.frames_replayed == 1  # fake-b's answer to frame 10, heard from fake-a already
    (change,) = changes
    assert (change.old_worker, change.new_worker, change.reason) == ("fake-a", "fake-b", "connection_lost")
    assert change.next_frame == 10 and change.resumed_frames == 10
    assert change.gap_ms is not None and change.gap_ms < 1000
    assert svc.reservation is not None and svc.reservation.worker_id == "fake-b"
    by_id = {w.worker_id: w for w in await store.workers()}
    assert by_id["fake-a"].suspect and not by_id["fake-b"].suspect
    assert by_id["fake-a"].reserved == by_id["fake-b"].reserved == 0  # released at the end
    assert [e.reason for e in b.ends] == ["caller_hangup"]
    texts = "".join(f.text for f in down if isinstance(f, TTSTextFrame)).split()
    assert len(texts) == len(set(texts))  # no text piece twice


async def test_a_move_resumes_elsewhere_then_ends_the_old_session(store: CallStore, workers) -> None:
    a = await workers(worker_id="fake-a", move_after=10)
    b = await workers(worker_id="fake-b")
    await store.register_worker("fake-a", a.url, max_slots=2)
    await store.register_worker("fake-b", b.url, max_slots=1)
    svc = service(store, "call-move")
    changes = changes_of(svc)
    down, up = await run_test(svc, frames_to_send=numbered_frames(30), pipeline_params=PARAMS)

    assert not [f for f in up if isinstance(f, ErrorFrame)] and svc.end_reason is None
    assert [s.ended.reason if s.ended else None for s in a.sessions] == ["moved"]  # the gateway ended it
    (start,) = b.starts
    assert start.resume is not None and start.resume.next_frame >= 9
    (change,) = changes
    assert (change.old_worker, change.new_worker, change.reason) == ("fake-a", "fake-b", "draining")
    numbers = heard(down)
    # The old worker kept serving until the new one was ready: nothing heard twice, nearly nothing lost.
    assert numbers == sorted(set(numbers)) and len(numbers) >= 27, numbers
    assert not {w.worker_id: w for w in await store.workers()}["fake-a"].suspect  # draining is no failure


async def test_a_move_with_no_worker_free_stays_on_the_old_worker(store: CallStore, workers) -> None:
    a = await workers(worker_id="fake-a", move_after=5)
    await store.register_worker("fake-a", a.url, max_slots=1)
    svc = service(store, "call-stay", failover_timeout_s=0.3)
    changes = changes_of(svc)
    down, up = await run_test(svc, frames_to_send=numbered_frames(20), pipeline_params=PARAMS)
    assert not [f for f in up if isinstance(f, ErrorFrame)] and svc.end_reason is None
    assert heard(down) == list(range(20)) and not changes
    assert len(a.sessions) == 1 and a.sessions[0].ended is not None
    assert a.sessions[0].ended.reason == "caller_hangup"


async def test_no_worker_to_take_over_ends_worker_lost_within_the_failover_timeout(
    store: CallStore, workers
) -> None:
    a = await workers(worker_id="fake-a", drop_after=4)
    await store.register_worker("fake-a", a.url, max_slots=1)
    svc = service(store, "call-alone", failover_timeout_s=1.0)
    ended_at: list[float] = []

    @svc.event_handler("on_session_ended")
    async def _ended(_service, reason: str, detail: str) -> None:
        ended_at.append(time.monotonic())

    started = time.monotonic()
    _, up = await run_test(svc, frames_to_send=numbered_frames(40), pipeline_params=PARAMS)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "no worker could take the call over" in errors[0].error
    assert svc.end_reason == "worker_lost" and svc.stats.failed_moves == 1
    assert ended_at and ended_at[0] - started < 0.3 + 4 * 0.08 + 1.0 + 2.0  # the timeout, not the call's length
    assert await store.redis.get("cc:reservation:call-alone") is None


async def test_a_failed_connect_tries_the_next_worker(store: CallStore, workers) -> None:
    b = await workers(worker_id="fake-b")
    await store.register_worker("dead", "ws://127.0.0.1:9", max_slots=4)  # most free slots, nobody listening
    await store.register_worker("fake-b", b.url, max_slots=1)
    svc = service(store, "call-next")
    down, up = await run_test(svc, frames_to_send=numbered_frames(5), pipeline_params=PARAMS)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert svc.ready is not None and svc.ready.worker_id == "fake-b" and heard(down) == list(range(5))
    by_id = {w.worker_id: w for w in await store.workers()}
    assert by_id["dead"].suspect and by_id["dead"].reserved == 0


async def test_a_lapsed_heartbeat_moves_the_call(store: CallStore, workers) -> None:
    """The worker's connection stays up but it stopped heartbeating (a wedged or partitioned host)."""
    a = await workers(worker_id="fake-a")
    b = await workers(worker_id="fake-b")
    await store.register_worker("fake-a", a.url, max_slots=2, heartbeat_s=0.5)
    await store.register_worker("fake-b", b.url, max_slots=1)
    svc = service(store, "call-hb", heartbeat_check_s=0.2)
    changes = changes_of(svc)

    async def lapse() -> None:
        await asyncio.sleep(1.0)
        await store.redis.hset("cc:worker:fake-a", "heartbeat_at", repr(time.time() - 60))

    lapsing = asyncio.create_task(lapse())
    down, up = await run_test(svc, frames_to_send=numbered_frames(30), pipeline_params=PARAMS)
    await lapsing
    assert not [f for f in up if isinstance(f, ErrorFrame)] and svc.end_reason is None
    (change,) = changes
    assert (change.old_worker, change.new_worker, change.reason) == ("fake-a", "fake-b", "heartbeat_lapsed")
    numbers = heard(down)
    assert numbers == sorted(set(numbers)) and numbers[-1] == 29


async def test_a_worker_that_stops_answering_while_it_heartbeats_loses_the_call(store: CallStore, workers) -> None:
    """Its host and heartbeat are fine, its engine is wedged (or the network silently lost our
    frames): after answer_timeout_s with frames unanswered the call moves, with everything heard."""
    a = await workers(worker_id="fake-a", stall_after=8, stall_s=30.0)
    b = await workers(worker_id="fake-b")
    await store.register_worker("fake-a", a.url, max_slots=2)
    await store.register_worker("fake-b", b.url, max_slots=1)
    svc = service(store, "call-stalled", heartbeat_check_s=0.2, answer_timeout_s=0.8)
    changes = changes_of(svc)
    down, up = await run_test(svc, frames_to_send=numbered_frames(30), pipeline_params=PARAMS)
    assert not [f for f in up if isinstance(f, ErrorFrame)] and svc.end_reason is None
    (change,) = changes
    assert (change.old_worker, change.new_worker, change.reason) == ("fake-a", "fake-b", "worker_stalled")
    numbers = heard(down)
    assert numbers == sorted(set(numbers)) and numbers[-1] == 29
    assert await store.redis.exists("cc:worker:fake-a:suspect")  # no new call goes there for now


def test_a_starved_gateway_loop_is_not_taken_for_a_stalled_worker() -> None:
    """The gateway's own event loop was blocked (overload): when the watch wakes late, answers may
    be waiting unread, so the worker is credited with one; a timely watch counts the real silence."""
    from app.pipecat.service import LOOP_LAG_S, credited_answer_at

    on_time = credited_answer_at(now=10.2, asleep_at=10.0, period_s=0.2, last_answer_at=7.0)
    assert on_time == 7.0  # 3.2 s of silence seen by a watch that kept time: the worker's
    starved = credited_answer_at(now=12.0, asleep_at=10.0, period_s=0.2, last_answer_at=7.0)
    assert starved == pytest.approx(11.8)  # woke 1.8 s late: no verdict on the worker from this round
    barely = credited_answer_at(now=10.2 + LOOP_LAG_S, asleep_at=10.0, period_s=0.2, last_answer_at=7.0)
    assert barely == 7.0
    recent = credited_answer_at(now=12.0, asleep_at=10.0, period_s=0.2, last_answer_at=11.9)
    assert recent == 11.9


def test_the_tape_keeps_a_context_of_frames_and_the_caller_audio_a_resume_needs() -> None:
    tape = CallTape(caller_frames=protocol.MAX_WARM_FRAMES + 4)
    total = protocol.MAX_RESUME_FRAMES + 500
    for j in range(total):
        tape.add_caller(np.full(protocol.FRAME_SAMPLES, j % 1000, dtype="<i2").tobytes())
        tokens = np.full(protocol.TOKENS_PER_FRAME, frame_token(j - 1)) if j else None
        tape.add_answer(j, tokens)
    tape.add_answer(5, np.full(protocol.TOKENS_PER_FRAME, 7))  # an old frame again (a resumed worker): ignored
    assert tape.completed == total - 1
    frames = tape.frames()
    assert frames.shape == (protocol.MAX_RESUME_FRAMES, protocol.TOKENS_PER_FRAME)  # bounded: one context
    assert int(frames[0, 0]) == frame_token(total - 1 - protocol.MAX_RESUME_FRAMES)
    assert int(frames[-1, 0]) == frame_token(total - 2)
    assert tape.caller(total - 1) is not None and tape.caller(total - 1 - (protocol.MAX_WARM_FRAMES + 4)) is None
    resume = tape.resume()
    assert resume.next_frame == total - 1 and resume.tokens().shape == frames.shape
    warm = resume.warm_pcm()
    assert warm.shape == (protocol.MAX_WARM_FRAMES, protocol.FRAME_SAMPLES)
    assert [int(w[0]) for w in warm] == [j % 1000 for j in range(total - 1 - protocol.MAX_WARM_FRAMES, total - 1)]
    assert len(protocol.encode(protocol.Start(call_id="c", persona="p", resume=resume))) < 300_000  # 136 + 128 kB
