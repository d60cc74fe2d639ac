"""The engine on the tiny model: one bot frame per caller frame, cached joins, isolation of rows."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from app.protocol import Ended, Error, Ready, Sampling, Text, Timing, unpack_bot_frame
from app.worker.engine import Engine, TickResult, next_grid_point
from app.worker.metrics import WorkerMetrics
from app.worker.runtime import Runtime, UnknownPersona
from app.worker.call import Call, SlotPhase

PERSONA = "waste-management"


def caller_frames(n: int, seed: int = 0) -> list[bytes]:
    """n frames of noisy 'speech' (PCM16)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n * 1920) / 24000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    audio = 0.2 * np.sin(2 * np.pi * 180 * t) * envelope + 0.02 * rng.standard_normal(t.shape)
    pcm = (audio * 32767).astype("<i2")
    return [pcm[i * 1920 : (i + 1) * 1920].tobytes() for i in range(n)]


class Outbox:
    """A sink that records what the engine delivers."""

    def __init__(self) -> None:
        self.items: list[object] = []
        self.event = threading.Event()

    def __call__(self, item: object) -> None:
        self.items.append(item)
        self.event.set()

    def of(self, kind: type) -> list:
        return [i for i in self.items if isinstance(i, kind)]


def make_engine(runtime: Runtime, **kw) -> Engine:
    return Engine(runtime, worker_id="w-test", max_queue_frames=kw.pop("max_queue_frames", 8), **kw)


def open_call(engine: Engine, call_id: str, seed: int, persona: str = PERSONA) -> tuple[Call, Outbox]:
    out = Outbox()
    call = engine.open(call_id, persona, Sampling(seed=seed), out)
    assert call is not None
    return call, out


def run_ticks(engine: Engine, call: Call, frames: list[bytes]) -> list[TickResult]:
    results = []
    for f in frames:
        assert engine.push(call, f)
        results.append(engine.step())
    return results


def row(result: TickResult, slot: int) -> tuple[int, list[int], bytes]:
    i = result.slots.index(slot)
    return result.text[i], result.audio[i].tolist(), result.pcm[i]


def test_a_call_gets_ready_then_one_bot_frame_per_caller_frame(runtime: Runtime) -> None:
    metrics = WorkerMetrics(runtime.max_slots)
    engine = make_engine(runtime, metrics=metrics)
    call, out = open_call(engine, "call-1", seed=1)
    engine.step()  # between ticks: the persona state is copied into the slot
    (ready,) = out.of(Ready)
    assert (ready.call_id, ready.slot, ready.worker_id) == ("call-1", call.slot, "w-test")
    assert 0 <= ready.prefill_ms < 1000
    frames = caller_frames(6)
    for i, f in enumerate(frames):
        engine.push(call, f)
        result = engine.step()
        assert result.slots == [call.slot]
        assert len(out.of(bytes)) == i + 1
    bot = [unpack_bot_frame(b) for b in out.of(bytes)]
    assert any(np.frombuffer(pcm, "<i2").any() for pcm, _ in bot)  # the tiny model makes (noise) audio
    # Each step after the first completes the call frame before it: its 17 tokens come with the audio.
    assert bot[0][1] is None and all(tokens is not None for _, tokens in bot[1:])
    history = call.history  # the handle is the engine's record of the call
    assert history.completed == 5 and np.array_equal(history.span(0, 5), np.stack([t for _, t in bot[1:]]))
    assert engine.step().slots == []  # no caller frame queued: the slot does not run, no output
    assert len(out.of(bytes)) == 6
    for text in out.of(Text):
        assert text.text and "▁" not in text.text
        assert 0 <= text.frame < 6
    engine.end(call, "caller_hangup")
    engine.step()
    (ended,) = out.of(Ended)
    assert (ended.reason, ended.frames_in, ended.frames_out) == ("caller_hangup", 6, 6)
    assert engine.scheduler.phase(call.slot) is SlotPhase.FREE
    rendered = metrics.render().decode()
    assert "worker_frames_out_total 6.0" in rendered
    assert "worker_frames_in_total 6.0" in rendered


def test_text_tokens_become_pieces_without_padding(runtime: Runtime) -> None:
    assert runtime.text_piece(0) is None and runtime.text_piece(3) is None
    pieces = [runtime.text_piece(i) for i in range(4, runtime.tokenizer.vocab_size())]
    assert all(p is not None and "▁" not in p for p in pieces)
    spaced = [i for i in range(runtime.tokenizer.vocab_size()) if runtime.tokenizer.id_to_piece(i).startswith("▁")]
    assert spaced and runtime.text_piece(spaced[0]).startswith(" ")


def test_end_answers_the_frames_still_queued(runtime: Runtime) -> None:
    engine = make_engine(runtime)
    call, out = open_call(engine, "call-drain", seed=2)
    engine.step()
    for f in caller_frames(3):
        engine.push(call, f)
    engine.end(call)
    for _ in range(4):
        engine.step()
    assert len(out.of(bytes)) == 3
    (ended,) = out.of(Ended)
    assert (ended.frames_in, ended.frames_out) == (3, 3)


def test_abort_frees_the_slot_without_answering(runtime: Runtime) -> None:
    engine = make_engine(runtime)
    call, out = open_call(engine, "call-abort", seed=3)
    engine.step()
    for f in caller_frames(3):
        engine.push(call, f)
    engine.abort(call)
    engine.step()
    assert out.of(bytes) == []
    assert out.of(Ended)[0].reason == "aborted"
    assert engine.scheduler.stats().free == runtime.max_slots


def test_the_handle_of_an_ended_call_never_touches_the_next_call_in_its_slot(runtime: Runtime) -> None:
    engine = make_engine(runtime, max_queue_frames=2)
    calls = [open_call(engine, f"c{i}", seed=i)[0] for i in range(runtime.max_slots)]
    engine.step()
    old = calls[0]
    engine.abort(old)
    engine.step()
    new, out = open_call(engine, "next", seed=9)
    engine.step()
    assert new.slot == old.slot and new is not old and out.of(Ready)
    frames = caller_frames(2)
    assert not engine.push(old, frames[0])  # the old handle: refused, not queued for the new call
    engine.end(old)
    engine.abort(old)
    assert engine.push(new, frames[1])
    result = engine.step()
    assert new.slot in result.slots and out.of(Ended) == [] and len(out.of(bytes)) == 1
    assert engine.scheduler.phase(new.slot) is SlotPhase.ACTIVE and new.frames_in == 1
    for call in calls[1:] + [new]:
        engine.abort(call)
    engine.step()
    assert engine.scheduler.stats().free == runtime.max_slots


def test_a_slot_filled_from_the_persona_cache_behaves_like_one_prefilled_in_place(runtime: Runtime) -> None:
    frames = caller_frames(10, seed=5)

    engine = make_engine(runtime)
    call, _ = open_call(engine, "cached", seed=11)
    engine.step()  # join = reset + import of the cached state + sampling
    cached = [row(r, call.slot) for r in run_ticks(engine, call, frames)]
    engine.abort(call)
    engine.step()

    engine = make_engine(runtime)
    call, _ = open_call(engine, "in-place", seed=11)
    engine.step()
    # Overwrite the cached join with the full prompt prefill run in this very slot.
    runtime.prefill_in_place(call.slot, PERSONA, Sampling(seed=11))
    in_place = [row(r, call.slot) for r in run_ticks(engine, call, frames)]
    engine.abort(call)
    engine.step()

    assert [c[0] for c in cached] == [p[0] for p in in_place]  # text tokens
    assert [c[1] for c in cached] == [p[1] for p in in_place]  # audio codes
    assert [c[2] for c in cached] == [p[2] for p in in_place]  # bot PCM, bit for bit


def test_other_calls_are_unaffected_by_a_join_and_a_leave(runtime: Runtime) -> None:
    frames_a = caller_frames(9, seed=7)
    frames_b = caller_frames(9, seed=8)

    engine = make_engine(runtime)
    a, _ = open_call(engine, "a-alone", seed=21)
    engine.step()
    alone = [row(r, a.slot) for r in run_ticks(engine, a, frames_a)]
    engine.abort(a)
    engine.step()

    engine = make_engine(runtime)
    a, _ = open_call(engine, "a-shared", seed=21)
    engine.step()
    shared = []
    b = None
    for i, f in enumerate(frames_a):
        if i == 3:  # B joins right before tick 3, with another persona
            b, _ = open_call(engine, "b", seed=22, persona="restaurant-orders")
        if b is not None and 3 <= i < 6:
            engine.push(b, frames_b[i])
        if i == 6:
            engine.end(b)
        engine.push(a, f)
        result = engine.step()
        if 3 <= i < 6:
            assert len(result.slots) == 2  # both calls ran in the same batched tick
        shared.append(row(result, a.slot))
    assert b is not None and b.slot != a.slot
    assert engine.scheduler.phase(b.slot) is SlotPhase.FREE
    assert shared == alone


def test_a_top_k_beyond_the_workers_sampling_width_is_refused_at_open(runtime: Runtime) -> None:
    """The worker samples among a static number of candidates (the personas' largest top-k): a call
    asking for more is told so at once, not failed inside the engine thread."""
    from app.protocol import ProtocolError

    engine = make_engine(runtime)
    width = runtime.lm.sampling.text_width
    assert width is not None  # the tiny text vocabulary is larger than the personas' top-k
    with pytest.raises(ProtocolError, match="text_top_k"):
        engine.open("greedy-for-more", PERSONA, Sampling(text_top_k=width + 1), Outbox())
    with pytest.raises(ProtocolError, match="audio_top_k"):
        engine.open("no-filter", PERSONA, Sampling(audio_top_k=0), Outbox())
    call = engine.open("fits", PERSONA, Sampling(text_top_k=width, seed=1), Outbox())
    assert call is not None
    engine.abort(call)
    engine.step()


def test_unknown_persona_and_busy(runtime: Runtime) -> None:
    engine = make_engine(runtime)
    with pytest.raises(UnknownPersona):
        engine.open("x", "no-such-persona", None, Outbox())
    calls = [engine.open(f"c{i}", PERSONA, None, Outbox()) for i in range(runtime.max_slots)]
    assert all(call is not None for call in calls)
    assert engine.open("one-too-many", PERSONA, None, Outbox()) is None
    for call in calls:
        engine.abort(call)
    engine.step()
    assert engine.scheduler.stats().free == runtime.max_slots


def test_a_failing_join_reports_an_error_and_frees_the_slot(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(runtime)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(runtime, "join_slot", broken)
    call, out = open_call(engine, "broken", seed=1)
    engine.step()
    engine.step()
    (error,) = out.of(Error)
    assert error.code == "internal" and "boom" in error.message
    assert out.of(Ready) == []
    assert engine.scheduler.phase(call.slot) is SlotPhase.FREE


def test_tick_grid_skips_missed_points_without_drift_or_burst() -> None:
    period = 0.08
    # On time: the next grid point.
    assert next_grid_point(1.0, 1.05, period) == (pytest.approx(1.08), None)
    # Overran by 2.5 periods: one late tick at once (on a grid point in the past), no burst.
    nxt, behind = next_grid_point(1.0, 1.0 + 3.5 * period, period)
    assert behind == pytest.approx(2.5 * period)
    assert nxt <= 1.0 + 3.5 * period < nxt + period
    assert ((nxt - 1.0) / period) == pytest.approx(round((nxt - 1.0) / period))
    # After that late tick (quick), the following one is back on the original grid.
    after, behind2 = next_grid_point(nxt, nxt + 0.01, period)
    assert behind2 is None and after == pytest.approx(nxt + period)


def test_the_thread_answers_a_burst_one_frame_per_tick(runtime: Runtime) -> None:
    engine = make_engine(runtime, tick_s=0.08)
    engine.start()
    try:
        call, out = open_call(engine, "threaded", seed=4)
        assert out.event.wait(5.0)
        assert isinstance(out.items[0], Ready)
        for f in caller_frames(3):  # a burst of three frames: answered one per tick
            engine.push(call, f)
        deadline = time.monotonic() + 10.0
        while len(out.of(bytes)) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(out.of(bytes)) == 3
    finally:
        engine.stop()
    assert not engine.running
    assert engine.stats().busy_ticks == 3


def test_frames_queued_during_a_stall_are_caught_up_off_the_grid_not_left_queued(runtime: Runtime) -> None:
    """Six frames arrive at once (the worker stalled, or the network bunched them): the engine runs
    ticks back to back until the slot's queue is down to one frame, instead of one per grid point
    for the rest of the call. A 0.5 s grid makes the difference plain: on the grid alone the six
    answers would take >= 2.5 s."""
    engine = make_engine(runtime, tick_s=0.5)
    engine.start()
    try:
        call, out = open_call(engine, "behind", seed=4)
        assert out.event.wait(5.0)
        started = time.monotonic()
        for f in caller_frames(6):
            engine.push(call, f)
        deadline = started + 10.0
        while len(out.of(bytes)) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        caught_up_in = time.monotonic() - started
        assert len(out.of(bytes)) >= 5
        assert engine.scheduler.queued(call.slot) <= 1
    finally:
        engine.stop()
    assert caught_up_in < 2.0, caught_up_in  # generous; without catch-up it is >= 2.0 s by construction
    assert engine.stats().catch_ups >= 4


def test_the_engine_reports_how_long_caller_frames_wait_for_their_tick(runtime: Runtime) -> None:
    """Timing: the least wait over the first 4 frames, then over every 12, with the tick period.
    Each frame here is pushed as soon as the previous answer came, i.e. just after a tick, so from
    the second frame on each waits almost a whole period (0.4 s) for the next grid point."""
    engine = make_engine(runtime, tick_s=0.4)
    engine.start()
    pushed: list[float] = []
    answered: list[float] = []
    try:
        call, out = open_call(engine, "timed", seed=4)
        assert out.event.wait(5.0)
        frames = caller_frames(16)
        pushed.append(time.monotonic())
        engine.push(call, frames[0])  # lands at an arbitrary phase of the grid
        for i in range(1, 17):
            deadline = time.monotonic() + 10.0
            while len(out.of(bytes)) < i and time.monotonic() < deadline:
                time.sleep(0.002)
            answered.append(time.monotonic())
            if i < 16:
                pushed.append(time.monotonic())
                engine.push(call, frames[i])
        deadline = time.monotonic() + 5.0
        while len(out.of(Timing)) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        engine.stop()
    first, second = out.of(Timing)
    assert (first.frame, first.frames, second.frame, second.frames) == (3, 4, 15, 12)
    assert first.tick_ms == second.tick_ms == pytest.approx(400)
    # A frame's tick starts before its answer comes back, so the least wait is at most the least
    # push -> answer time of those 12 frames; and it is most of a period (the tick itself and the
    # push's delay after the previous answer take the rest: generous for a loaded box).
    least_round_trip_ms = min(a - p for p, a in zip(pushed[4:16], answered[4:16], strict=True)) * 1000
    assert 100 < second.wait_ms <= least_round_trip_ms, (second.wait_ms, least_round_trip_ms)
    assert first.wait_ms <= min(a - p for p, a in zip(pushed[:4], answered[:4], strict=True)) * 1000


def test_a_catch_up_tick_leaves_its_frames_waits_out_of_the_timing_report(runtime: Runtime) -> None:
    """A frame run in a catch-up tick went as soon as it came (its wait is ~0 whatever the grid):
    counted, it would tell the gateway to move its framing for a grid it was not run on."""
    engine = make_engine(runtime, tick_s=0.08)
    call, out = open_call(engine, "caught-up", seed=4)
    engine.step()  # the persona is loaded
    frames = caller_frames(10)
    for i, frame in enumerate(frames):
        engine.push(call, frame)
        if i in (2, 3, 4, 5, 6, 7, 9):
            engine.step(on_grid=False)  # run at once
        else:
            time.sleep(0.03)  # the frame waits for its grid point
            engine.step()
    assert len(out.of(bytes)) == 10
    assert out.of(Timing) == []  # 4 on-grid frames are needed for the first report; 3 ran on it
    engine.push(call, caller_frames(1)[0])
    time.sleep(0.03)
    engine.step()
    (timing,) = out.of(Timing)
    assert timing.frames == 4 and timing.frame == 10
    assert timing.wait_ms >= 25  # the on-grid frames' waits, not the catch-ups' ~0


def test_stop_tells_open_calls_the_worker_is_shutting_down(runtime: Runtime) -> None:
    engine = make_engine(runtime)
    engine.start()
    call, out = open_call(engine, "left-open", seed=1)
    assert out.event.wait(2.0)
    engine.stop()
    assert isinstance(out.items[-1], Error) and out.items[-1].code == "shutting_down"
    assert engine.open("late", PERSONA, None, Outbox()) is None
