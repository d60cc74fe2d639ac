"""PersonaPlexService in isolation, in a Pipecat pipeline driven by pipecat's run_test, against a fake worker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pipecat.frames.frames import (
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    SpeechOutputAudioRawFrame,
    TTSTextFrame,
)
from pipecat.pipeline.worker import PipelineParams
from pipecat.tests.utils import SleepFrame, run_test

from app import protocol
from app.callstate import CallStore, Reservation
from app.gateway.routing import RedisRouter
from app.pipecat.service import PersonaPlexService
from tests.pipecat.fake_worker import TOKEN, FakeWorker

PARAMS = PipelineParams(audio_in_sample_rate=8000, audio_out_sample_rate=8000)
MODEL_PARAMS = PipelineParams(audio_in_sample_rate=protocol.SAMPLE_RATE, audio_out_sample_rate=protocol.SAMPLE_RATE)
PHONE_RATE = 8000


def caller_audio(seconds: float, *, freq: float = 1000.0, rate: int = PHONE_RATE) -> list[Frame]:
    """A tone as 20 ms InputAudioRawFrames, with real-time pauses every 80 ms."""
    n = int(rate * 0.02)
    t = np.arange(int(rate * seconds)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    frames: list[Frame] = []
    for i, start in enumerate(range(0, len(pcm), n)):
        frames.append(InputAudioRawFrame(audio=pcm[start : start + n].tobytes(), sample_rate=rate, num_channels=1))
        if i % 4 == 3:
            frames.append(SleepFrame(0.08))
    return frames


def service_for(worker: FakeWorker, **kwargs) -> PersonaPlexService:
    kwargs.setdefault("reservation", Reservation(worker_id=worker.worker_id, url=worker.url))
    return PersonaPlexService(call_id="call-1", persona="general-assistant", worker_token=TOKEN, **kwargs)


def dominant_hz(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(float)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


@pytest.mark.asyncio
async def test_caller_audio_in_bot_audio_out_at_output_rate_paced(fake_worker: FakeWorker) -> None:
    service = service_for(fake_worker)
    pushed_at: list[float] = []

    @service.event_handler("on_after_push_frame")
    def _timestamps(_service, frame: Frame) -> None:
        if isinstance(frame, SpeechOutputAudioRawFrame):
            pushed_at.append(time.monotonic())

    frames = [SleepFrame(0.3), *caller_audio(0.8), SleepFrame(0.5)]
    down, up = await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)

    audio = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert len(audio) == 10  # 0.8 s of caller audio = 10 model frames -> 10 bot frames
    assert all(f.sample_rate == PHONE_RATE and f.num_frames == 640 for f in audio)  # 80 ms at 8 kHz
    assert fake_worker.frames_in == 10 and service.stats.frames_out == 10 and service.stats.frames_dropped == 0
    # The echoing worker returns the caller's 1 kHz tone: it survives 8k -> 24k -> 8k.
    body = b"".join(f.audio for f in audio[2:])
    assert abs(dominant_hz(body, PHONE_RATE) - 1000) < 20
    # Real-time pacing: one 80 ms frame per 80 ms; a frame the worker sent a little late (up to the
    # pacer's tolerance, half a frame) goes out at once and the next one on time, never sooner.
    assert min(np.diff(pushed_at)) > 0.08 - 0.04 - 0.005
    assert pushed_at[-1] - pushed_at[0] > 0.08 * (len(pushed_at) - 1) - 0.04 - 0.005
    texts = [f.text for f in down if isinstance(f, TTSTextFrame)]
    assert "".join(texts) == " word5 word10"
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert fake_worker.starts[0].call_id == "call-1" and fake_worker.starts[0].persona == "general-assistant"
    assert [e.reason for e in fake_worker.ends] == ["caller_hangup"]  # EndFrame -> protocol.End


@pytest.mark.asyncio
async def test_other_input_rates_are_converted_to_whole_model_frames(fake_worker: FakeWorker) -> None:
    service = service_for(fake_worker, output_sample_rate=16000)
    frames = [SleepFrame(0.3), *caller_audio(0.4, rate=16000), SleepFrame(0.4)]
    down, _ = await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)
    audio = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert fake_worker.frames_in == 5 and len(audio) == 5
    assert all(f.sample_rate == 16000 and f.num_frames == 1280 for f in audio)


@pytest.mark.asyncio
async def test_a_burst_beyond_the_output_queue_is_dropped_and_counted(fake_worker: FakeWorker) -> None:
    fake_worker.hold_frames = 10  # the worker stalls for 10 frames, then sends them all at once
    service = service_for(fake_worker, output_queue_frames=2, max_in_flight_frames=10)
    frames = [SleepFrame(0.3), *caller_audio(0.8), SleepFrame(0.5)]
    started = time.monotonic()
    down, _ = await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)
    audio = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    stats = service.stats
    assert stats.frames_received == 10
    assert stats.frames_out + stats.frames_dropped == 10
    assert len(audio) == stats.frames_out <= 3  # the queue holds 2 (+1 being pushed): no backlog
    assert stats.frames_dropped >= 7
    assert time.monotonic() - started < 2.5


@pytest.mark.asyncio
async def test_after_a_worker_stall_the_bot_audio_is_back_to_a_short_delay(fake_worker: FakeWorker) -> None:
    """A stalled worker answers late, then all at once: the caller must not keep that delay."""
    fake_worker.stall_after, fake_worker.stall_s = 8, 0.6
    service = service_for(fake_worker)
    arrived: dict[int, float] = {}
    played: dict[int, float] = {}

    def number(frame: Frame) -> int:
        return int(np.frombuffer(frame.audio, dtype="<i2")[0]) // 10 - 1

    @service.event_handler("on_before_process_frame")
    def _arrived(_service, frame: Frame) -> None:
        if isinstance(frame, InputAudioRawFrame):
            arrived[number(frame)] = time.monotonic()

    @service.event_handler("on_after_push_frame")
    def _played(_service, frame: Frame) -> None:
        if isinstance(frame, SpeechOutputAudioRawFrame):
            played[number(frame)] = time.monotonic()

    frames: list[Frame] = [SleepFrame(0.3)]
    for k in range(40):  # frame k: every sample 10 * (k + 1), echoed back by the fake
        pcm = np.full(protocol.FRAME_SAMPLES, 10 * (k + 1), dtype="<i2").tobytes()
        frames += [InputAudioRawFrame(audio=pcm, sample_rate=protocol.SAMPLE_RATE, num_channels=1), SleepFrame(0.08)]
    await run_test(service, frames_to_send=[*frames, SleepFrame(0.5)], pipeline_params=MODEL_PARAMS)

    order = sorted(played)
    assert [played[k] for k in order] == sorted(played.values())  # in order, each once
    stats = service.stats
    assert stats.playout_restarts >= 1 and stats.playout_resyncs >= 1  # restarted, then re-synced
    assert stats.frames_out + stats.frames_dropped == stats.frames_received == 40
    delays = sorted(played[k] - arrived[k] for k in order[-10:])
    assert delays[len(delays) // 2] < 0.16, delays  # a kept backlog of 3-4 frames would be 0.24-0.32 s


@pytest.mark.asyncio
async def test_reserves_through_redis_and_end_frame_releases_the_slot(
    fake_worker: FakeWorker, store: CallStore
) -> None:
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=2)
    service = PersonaPlexService(
        call_id="call-2", persona="general-assistant", worker_token=TOKEN, router=RedisRouter(store, suspect_s=5)
    )
    free_while_active: list[int] = []

    @service.event_handler("on_ready")
    async def _on_ready(_service, ready) -> None:
        free_while_active.append(await store.free_slots())

    await run_test(service, frames_to_send=[SleepFrame(0.3), *caller_audio(0.16)], pipeline_params=PARAMS)
    assert free_while_active == [1]
    assert service.reservation is not None and service.reservation.worker_id == "fake-1"
    assert await store.free_slots() == 2
    assert len(fake_worker.ends) == 1 and service.end_reason is None


@pytest.mark.asyncio
async def test_worker_connection_loss_is_an_error_frame_and_frees_the_slot(
    fake_worker: FakeWorker, store: CallStore
) -> None:
    fake_worker.drop_after = 3
    await store.register_worker(fake_worker.worker_id, fake_worker.url, max_slots=1)
    service = PersonaPlexService(
        call_id="call-3", persona="general-assistant", worker_token=TOKEN,
        router=RedisRouter(store, suspect_s=5), failover_timeout_s=0.5,
    )
    ended: list[tuple[str, str]] = []

    @service.event_handler("on_session_ended")
    async def _on_ended(_service, reason: str, detail: str) -> None:
        ended.append((reason, detail))

    frames = [SleepFrame(0.3), *caller_audio(0.48), SleepFrame(0.3)]
    _, up = await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "worker connection lost" in errors[0].error
    assert service.end_reason == "worker_lost" and ended[0][0] == "worker_lost"
    assert "no worker could take the call over" in errors[0].error  # the only worker is gone
    assert not service.is_usable
    (info,) = await store.workers()
    assert info.reserved == 0 and await store.redis.get("cc:reservation:call-3") is None  # slot released
    assert info.suspect and await store.free_slots() == 0  # no new call goes there for a while


@pytest.mark.asyncio
async def test_no_free_slot_is_an_error_frame_with_reason_busy(store: CallStore) -> None:
    service = PersonaPlexService(
        call_id="call-4", persona="general-assistant", worker_token=TOKEN, router=RedisRouter(store, suspect_s=5)
    )
    _, up = await run_test(service, frames_to_send=[SleepFrame(0.2)], pipeline_params=PARAMS)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "no worker has a free slot" in errors[0].error
    assert service.end_reason == "busy"


@pytest.mark.asyncio
async def test_a_wrong_worker_token_is_reported_clearly(fake_worker: FakeWorker) -> None:
    service = PersonaPlexService(
        call_id="call-5",
        persona="general-assistant",
        worker_token="not-the-token",
        reservation=Reservation(worker_id=fake_worker.worker_id, url=fake_worker.url),
    )
    _, up = await run_test(service, frames_to_send=[SleepFrame(0.3)], pipeline_params=PARAMS)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "HTTP 403" in errors[0].error and "WORKER_TOKEN" in errors[0].error
    assert service.end_reason == "error"


@pytest.mark.asyncio
async def test_a_worker_still_freeing_the_reserved_slot_is_asked_again(fake_worker: FakeWorker) -> None:
    """Redis holds a slot for the call on that worker, but the worker answers busy: the previous
    call's End is still on its way. The call gets the slot a moment later instead of failing."""
    fake_worker.refuse, fake_worker.refuse_times = "busy", 3
    service = service_for(fake_worker)
    _, up = await run_test(service, frames_to_send=[SleepFrame(0.5)], pipeline_params=PARAMS)
    assert not [f for f in up if isinstance(f, ErrorFrame)]
    assert service.ready is not None and service.end_reason is None
    assert len(fake_worker.starts) == 4


async def test_a_worker_busy_for_longer_ends_the_call_busy(fake_worker: FakeWorker) -> None:
    fake_worker.refuse = "busy"
    service = service_for(fake_worker)
    _, up = await run_test(service, frames_to_send=[SleepFrame(1.5)], pipeline_params=PARAMS)
    assert [f for f in up if isinstance(f, ErrorFrame)] and service.end_reason == "busy"


async def test_a_worker_refusal_ends_the_session(fake_worker: FakeWorker) -> None:
    fake_worker.refuse = "unknown_persona"
    service = service_for(fake_worker)
    _, up = await run_test(service, frames_to_send=[SleepFrame(0.3)], pipeline_params=PARAMS)
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and "unknown_persona" in errors[0].error
    assert service.end_reason == "error" and service.ready is None


class _Clock:
    """The absolute clock of one caller's messages (anchored when the first is sent)."""

    def __init__(self) -> None:
        self.t0: float | None = None


class SleepUntil(SleepFrame):
    """A SleepFrame that sleeps until `offset_s` after the clock's anchor, as a caller that sends
    on its own clock does (relative sleeps drift a few ms per frame on a busy loop)."""

    def __init__(self, clock: _Clock, offset_s: float) -> None:
        super().__init__()
        self._clock, self._offset_s = clock, offset_s

    @property
    def sleep(self) -> float:
        now = time.monotonic()
        if self._clock.t0 is None:
            self._clock.t0 = now - self._offset_s
        return max(0.0, self._clock.t0 + self._offset_s - now)

    @sleep.setter
    def sleep(self, _value: float) -> None:  # SleepFrame's own default
        pass


def realtime_caller_audio(seconds: float, *, rate: int = PHONE_RATE) -> list[Frame]:
    """Speech-like audio as 20 ms InputAudioRawFrames on an absolute 20 ms clock (as Twilio sends
    them): a tone in bursts with quiet pauses, so a framing shift can take a pause."""
    n = int(rate * 0.02)
    t = np.arange(int(rate * seconds)) / rate
    on = (t % 0.6) < 0.4
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 700 * t) * on).astype("<i2")
    clock = _Clock()
    frames: list[Frame] = []
    for i, start in enumerate(range(0, len(pcm), n)):
        frames += [SleepUntil(clock, 0.02 * i)]
        frames += [InputAudioRawFrame(audio=pcm[start : start + n].tobytes(), sample_rate=rate, num_channels=1)]
    return frames


@pytest.mark.asyncio
async def test_caller_frames_are_cut_to_complete_just_before_the_workers_tick(fake_worker: FakeWorker) -> None:
    """The worker ticks on its own grid; here the caller's frames first complete 70 ms before a
    tick, so each waits 70 ms there for nothing. From the worker's Timing reports the service
    drops caller audio once (three 20 ms messages, in a pause) and the frames then wait at most
    one message plus the margin. The latency it reports per frame says the same."""
    fake_worker.tick_s, fake_worker.tick_phase_s = 0.08, 0.07
    latencies = []
    service = service_for(fake_worker, on_latency=latencies.append)
    frames = [SleepFrame(0.3), *realtime_caller_audio(4.0), SleepFrame(0.4)]
    await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)

    [session] = fake_worker.sessions
    assert session.timings[0].wait_ms > 50  # before: ~70 ms
    assert service.stats.align_shifts >= 1 and service.stats.align_dropped_ms >= 40
    late = session.waits[-12:]  # the last second
    assert max(late) < 0.045, late  # after: 8-28 ms (+ this loop's jitter); generous for a loaded box
    assert np.median(late) < 0.035
    # each played frame's latency, by segment: the worker's share fell with the wait
    assert len(latencies) > 30
    worker_first = np.median([f.worker for f in latencies[:4]])
    worker_last = np.median([f.worker for f in latencies[-12:]])
    assert worker_first > 0.05 and worker_last < 0.04, (worker_first, worker_last)
    assert all(f.gateway_in >= 0 and f.gateway_out >= 0 and f.total >= f.worker for f in latencies)


@pytest.mark.asyncio
async def test_framing_stays_put_when_alignment_is_off(fake_worker: FakeWorker) -> None:
    fake_worker.tick_s, fake_worker.tick_phase_s = 0.08, 0.07
    service = service_for(fake_worker, frame_align=False)
    frames = [SleepFrame(0.3), *realtime_caller_audio(2.0), SleepFrame(0.3)]
    await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)
    [session] = fake_worker.sessions
    assert service.stats.align_shifts == 0
    assert np.median(session.waits[-8:]) > 0.05


@pytest.mark.asyncio
async def test_a_stalled_workers_frames_wait_at_the_gateway_and_none_is_lost(fake_worker: FakeWorker) -> None:
    """A worker's queue holds max_in_flight frames (a real one drops beyond it, and every later
    answer would then be matched to the wrong caller frame). While it stalls, the caller's frames
    wait here; afterwards they go as its answers come, the worker catches up, and every caller
    frame is answered once, in order."""
    fake_worker.tick_s, fake_worker.tick_phase_s = 0.08, 0.01
    fake_worker.stall_after, fake_worker.stall_s = 10, 0.35
    service = service_for(fake_worker, max_in_flight_frames=3)
    frames = [SleepFrame(0.3), *realtime_caller_audio(3.2), SleepFrame(0.6)]
    await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)

    [session] = fake_worker.sessions
    assert session.max_queued <= 3  # never more than the window at the worker
    stats = service.stats
    assert stats.frames_in == len(session.frames) == stats.frames_received
    # 3.2 s: 40 frames, less alignment drops; none lost to the queue bound (this worker never
    # catches up, so a frame that stood in the send queue for a second may be left unsent).
    assert stats.frames_in + stats.backlog_dropped >= 36 and stats.input_frames_dropped == stats.backlog_dropped
    assert stats.frames_out + stats.frames_dropped == stats.frames_received


@pytest.mark.asyncio
async def test_a_backlog_that_stands_in_the_send_queue_is_left_unsent_in_a_pause(fake_worker: FakeWorker) -> None:
    """A worker that only just keeps real time (one frame per 80 ms tick, no catch-up) after a
    stall: without help the frames that queued at the gateway during the stall wait there for
    the rest of the call. After a second of that, that many frames go unsent (quiet ones first)
    and the caller's audio reaches the worker without the wait again."""
    fake_worker.tick_s, fake_worker.tick_phase_s = 0.08, 0.01
    fake_worker.stall_after, fake_worker.stall_s = 8, 0.6
    latencies = []
    service = service_for(fake_worker, max_in_flight_frames=2, frame_align=False, on_latency=latencies.append)
    frames = [SleepFrame(0.3), *realtime_caller_audio(6.0), SleepFrame(0.6)]
    await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)

    stats = service.stats
    assert stats.backlog_dropped >= 2  # the stall's 0.6 s, less the worker's window of 2
    assert stats.input_frames_dropped == stats.backlog_dropped  # the queue bound dropped none
    waited = [f.gateway_in for f in latencies]
    assert len(waited) > 40
    assert max(waited[8:20]) > 0.12  # right after the stall: frames stood at the gateway
    assert np.median(waited[-15:]) < 0.04, waited[-15:]  # at the end: not a frame's wait


@pytest.mark.asyncio
@pytest.mark.parametrize("chunk_s", [0.020, 0.040])
async def test_a_delay_that_stands_after_a_stall_is_cut_out_of_the_bot_audio(
    fake_worker: FakeWorker, chunk_s: float
) -> None:
    """After the worker's burst the pacer keeps one frame behind the playing one (its playout
    target): 80 ms more than the caller needs, for the rest of the call. From the pacer's lead
    reports the service cuts it out, in the bot's pauses, in whole output chunks (the transport
    holds a partial one back), and the frames then wait no more than half a step (no margin by
    default: as at the start of the call)."""
    fake_worker.stall_after, fake_worker.stall_s = 6, 0.45  # not whole frames: a phase as well
    latencies = []
    service = service_for(fake_worker, frame_align=False, on_latency=latencies.append, output_chunk_s=chunk_s)
    frames = [SleepFrame(0.3), *realtime_caller_audio(5.0), SleepFrame(0.4)]
    down, _ = await run_test(service, frames_to_send=frames, pipeline_params=PARAMS)

    stats = service.stats
    assert stats.playout_restarts >= 1
    assert stats.playout_trimmed_ms >= 40
    chunk_bytes = round(chunk_s * PHONE_RATE) * 2
    bot = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    # Cut by whole chunks only (a part of a frame or, where a whole frame stood, all of it: which
    # one depends on where the stall left the phase, so either may come on a loaded box).
    assert all(len(f.audio) % chunk_bytes == 0 for f in bot)
    out = [f.gateway_out for f in latencies]
    assert len(out) > 40
    # Half a step at most, and this loop's jitter: not a frame.
    assert np.median(out[-12:]) < chunk_s / 2 + 0.015, out[-12:]


def test_an_output_chunk_that_does_not_divide_the_frame_is_refused(fake_worker: FakeWorker) -> None:
    for chunk_s in (0.0, 0.03, 0.16):
        with pytest.raises(ValueError, match="output_chunk_s"):
            service_for(fake_worker, output_chunk_s=chunk_s)
