"""OutputPacer on a virtual clock: when bot frames go out, given when they arrive from the worker.

Each test feeds numbered frames at chosen arrival times and records when the pacer handed each one
out. What a caller hears depends on three things checked here: frames go out in order, once, never
faster than real time (beyond the tolerance); a late frame's latency does not stay; and the latency
the pacer adds stays bounded, whatever the worker does.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import pytest

from app.pipecat.pacer import OutputPacer, Paced
from app.pipecat.playout_trim import PlayoutTrim

FRAME = 0.08


class VirtualClock:
    """time() and sleep() for the pacer, advanced by `run` instead of waiting."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._seq), future))
        await future

    async def run(self, until: float) -> None:
        while True:
            for _ in range(20):  # let every task that can run do so
                await asyncio.sleep(0)
            if not self._timers or self._timers[0][0] > until:
                break
            at, _, future = heapq.heappop(self._timers)
            self.now = at
            future.set_result(None)
        self.now = until


async def play(
    arrivals: list[float],
    *,
    capacity: int = 4,
    target: int = 1,
    cut: Callable[[Paced], float] | None = None,
) -> tuple[list[tuple[float, Paced]], int]:
    """Frame i arrives at arrivals[i]; returns (push time, Paced) per frame handed out, and drops on
    arrival. `cut`: seconds the consumer cuts from each frame it is handed (told to the pacer)."""
    clock = VirtualClock()
    pacer: OutputPacer[int] = OutputPacer(
        capacity=capacity, target_frames=target, frame_s=FRAME, clock=clock.time, sleep=clock.sleep
    )
    pushed: list[tuple[float, Paced]] = []
    dropped_on_arrival = 0

    async def feed() -> None:
        nonlocal dropped_on_arrival
        for at, group in itertools.groupby(sorted(enumerate(arrivals), key=lambda pair: pair[1]), lambda p: p[1]):
            await clock.sleep(at - clock.now)
            for index, _ in group:  # frames arriving together are queued together
                dropped_on_arrival += pacer.put(index)

    async def consume() -> None:
        while True:
            paced = await pacer.next()
            pushed.append((clock.now, paced))
            if cut is not None and (seconds := cut(paced)):
                pacer.advance(seconds)

    tasks = [asyncio.create_task(feed()), asyncio.create_task(consume())]
    await clock.run(until=max(arrivals) + 1.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return pushed, dropped_on_arrival


def trimming(trim: PlayoutTrim) -> Callable[[Paced], float]:
    """A consumer that cuts as the service does, with the bot listening (quiet 80 ms frames)."""

    def cut(paced: Paced) -> float:
        if paced.restarted:
            trim.cancel()
        if paced.lead_s is not None:
            trim.offer(paced.lead_s, now=0.0)
        return trim.cut(bytes(1280), 8000, now=0.0)[1]

    return cut


def latencies(pushed: list[tuple[float, Paced]], arrivals: list[float]) -> list[float]:
    return [at - arrivals[paced.item] for at, paced in pushed]


def assert_in_order_once_and_never_fast(pushed: list[tuple[float, Paced]], tolerance: float = FRAME / 2) -> None:
    items = [paced.item for _, paced in pushed]
    assert items == sorted(set(items)), items
    times = [at for at, _ in pushed]
    assert all(b - a >= FRAME - tolerance - 1e-9 for a, b in zip(times, times[1:])), times


@pytest.mark.asyncio
async def test_jittery_frames_go_out_one_per_frame_period_with_nothing_dropped() -> None:
    jitter = [0.0, 0.03, 0.01, 0.025, 0.005, 0.02]
    arrivals = [0.1 + k * FRAME + jitter[k % len(jitter)] for k in range(50)]
    pushed, dropped = await play(arrivals)
    assert len(pushed) == 50 and dropped == 0
    assert not any(p.dropped or p.restarted for _, p in pushed)
    assert_in_order_once_and_never_fast(pushed)
    times = [at for at, _ in pushed]
    assert all(abs((b - a) - FRAME) < 0.031 for a, b in zip(times, times[1:]))  # the schedule, caught up within jitter
    assert max(latencies(pushed, arrivals)) <= FRAME / 2 + 1e-9


@pytest.mark.asyncio
async def test_a_slightly_late_frame_goes_out_at_once_and_the_schedule_is_kept() -> None:
    arrivals = [0.1 + k * FRAME for k in range(20)]
    arrivals[8] += 0.03  # within the tolerance
    pushed, _ = await play(arrivals)
    times = [at for at, _ in pushed]
    assert times[8] == pytest.approx(arrivals[8])  # no later than it came
    assert times[9] == pytest.approx(0.1 + 9 * FRAME)  # and the next one is back on time
    assert not any(p.restarted or p.dropped for _, p in pushed)


@pytest.mark.asyncio
async def test_after_a_worker_stall_the_clock_restarts_and_the_backlog_is_resynced_away() -> None:
    """Frames 10..16 arrive together 0.6 s late, then the worker is back on its tick."""
    arrivals = [0.1 + k * FRAME for k in range(60)]
    for k in range(10, 17):
        arrivals[k] = 0.1 + 16 * FRAME + 0.001
    pushed, dropped = await play(arrivals)
    assert_in_order_once_and_never_fast(pushed)
    restarts = [p.item for _, p in pushed if p.restarted]
    assert restarts == [15]  # the burst kept its newest (capacity 4, target 1); the clock restarts, no catch-up
    resynced = sum(p.dropped for _, p in pushed)
    assert resynced > 0 and len(pushed) + resynced + dropped == 60  # each frame out once or dropped
    late = latencies(pushed, arrivals)
    bound = 2 * FRAME + FRAME / 2  # (target + 1) frames + the tolerance
    assert max(late) <= bound + 1e-9, late
    assert max(late[-20:]) <= bound + 1e-9  # the stall's latency did not stay


@pytest.mark.asyncio
async def test_a_worker_clock_running_fast_stays_within_the_playout_target() -> None:
    arrivals = [0.1 + k * FRAME * 0.985 for k in range(400)]  # 1.5 % fast: ~6 frames over the call
    pushed, dropped = await play(arrivals)
    assert_in_order_once_and_never_fast(pushed)
    assert sum(p.dropped for _, p in pushed) + dropped >= 4  # re-synced a few times, one frame each
    assert max(latencies(pushed, arrivals)) <= 2 * FRAME + FRAME / 2 + 1e-9


@pytest.mark.asyncio
async def test_a_burst_beyond_the_capacity_drops_the_oldest_on_arrival() -> None:
    arrivals = [0.1] * 10
    pushed, dropped = await play(arrivals, capacity=4)
    assert dropped == 6
    assert [p.item for _, p in pushed] == [8, 9]  # the newest: no backlog is played
    assert sum(p.dropped for _, p in pushed) == 2


def test_the_playout_target_fits_in_the_capacity() -> None:
    assert OutputPacer(capacity=1, target_frames=1).target_frames == 0
    with pytest.raises(ValueError):
        OutputPacer(capacity=0)


@pytest.mark.asyncio
async def test_the_least_wait_of_each_window_of_frames_is_reported() -> None:
    """Two frames come together, then one per frame: one frame always stands behind the playing
    one, a whole frame of delay the playout target allows but nobody needs."""
    arrivals = [0.1, 0.1] + [0.1 + k * FRAME + 0.003 * (k % 3) for k in range(1, 60)]
    pushed, _ = await play(arrivals)
    leads = [(i, p.lead_s) for i, (_, p) in enumerate(pushed) if p.lead_s is not None]
    assert [i for i, _ in leads] == [4, 8, 12, 24, 36, 48, 60]  # three windows of 4 after the first frame, then of 12
    for _, lead in leads:
        assert lead == pytest.approx(FRAME - 0.006, abs=1e-6)  # the latest of them still waited that long


@pytest.mark.asyncio
async def test_a_consumer_that_cuts_the_lead_takes_a_standing_frame_out_and_keeps_time() -> None:
    arrivals = [0.1, 0.1] + [0.1 + k * FRAME + 0.003 * (k % 3) for k in range(1, 80)]
    margin = 0.01

    def cut(paced: Paced) -> float:  # as PlayoutTrim does, in one go
        return max(0.0, paced.lead_s - margin) if paced.lead_s is not None else 0.0

    pushed, dropped = await play(arrivals, cut=cut)
    assert dropped == 0 and not any(p.dropped or p.restarted for _, p in pushed)
    late = latencies(pushed, arrivals)
    assert min(late[1:5]) > FRAME - 0.01  # before the first report: a frame behind
    assert max(late[-30:]) <= margin + 0.006 + 1e-6  # after: the margin and the jitter, no more
    leads = [p.lead_s for _, p in pushed[-30:] if p.lead_s is not None]
    assert leads and all(lead >= margin - 1e-6 for lead in leads)  # the margin stays: never late


@pytest.mark.asyncio
@pytest.mark.parametrize("tick", [0.026, 0.045])
async def test_after_a_stall_and_the_catch_up_burst_a_trimming_consumer_is_back_to_the_start_within_a_second(
    tick: float,
) -> None:
    """The worker (26 or 45 ms ticks on an 80 ms grid) stops for 300 ms, then runs its queued frames
    back to back and goes on on its grid, whose phase the stall did not move. The first frames set
    the schedule as they come; after the stall, the frames must wait no more than that again (within
    half a 20 ms step) a second after the worker resumed: the catch-up burst, which comes earlier and
    earlier, must not hide the delay that stays from the first report."""
    resume = 1.3
    arrivals, free_at = [], 0.0  # free_at: when the worker can start its next tick
    for k in range(60):
        start = max(k * FRAME, free_at)  # the grid point, or at once while frames are queued
        if 1.0 < start < resume:
            start = resume  # stopped
        free_at = start + tick
        arrivals.append(free_at)
    if tick == 0.026:
        assert arrivals[13:18] == pytest.approx([1.326, 1.352, 1.378, 1.404, 1.43]) and arrivals[18] == pytest.approx(18 * FRAME + tick)
    trim = PlayoutTrim()
    pushed, _ = await play(arrivals, cut=trimming(trim))
    assert_in_order_once_and_never_fast(pushed, tolerance=FRAME)  # a whole frame cut: the next goes at once
    assert any(p.restarted for _, p in pushed) and trim.trims >= 1
    waits = [(arrivals[p.item], at - arrivals[p.item]) for at, p in pushed]
    before = [wait for at, wait in waits if at < 1.0]
    after = [wait for at, wait in waits if at >= resume + 1.0]
    assert max(before) <= 0.001 and len(after) >= 20
    assert max(after) <= 0.010 + 1e-6, waits  # the call's start again, within half a step


@pytest.mark.asyncio
async def test_after_a_stall_whose_first_frame_after_the_restart_waited_nothing_the_delay_still_goes() -> None:
    """Arrivals as measured at a gateway (bench/latency.py, a loaded box): the worker stalled
    150 ms, a frame came on time right after the restarted clock's first one, then two came 43 ms
    apart (the worker catching up, slower than a burst of fast ticks), then one per frame again,
    each ~70 ms before its due time. The first short window sees the on-time frame and asks for
    nothing; the next windows must still see the 70 ms and cut it."""
    steady = [0.1 + k * FRAME for k in range(30)]  # the last at 2.42
    gaps = [0.156, 0.094, 0.043, 0.043, 0.094, 0.051, 0.093, 0.068, 0.083, 0.073, 0.079, 0.082, 0.088, 0.086, 0.076]
    arrivals = list(steady)
    for gap in gaps:
        arrivals.append(arrivals[-1] + gap)
    restart_at = steady[-1] + gaps[0]
    while len(arrivals) < 60:
        arrivals.append(arrivals[-1] + FRAME)
    pushed, _ = await play(arrivals, cut=trimming(PlayoutTrim()))
    assert [arrivals[p.item] for _, p in pushed if p.restarted] == [pytest.approx(restart_at)]
    after = [at - arrivals[p.item] for at, p in pushed if arrivals[p.item] >= restart_at + 1.2]
    assert len(after) >= 10 and max(after) <= 0.010 + 1e-6, after


def test_advance_refuses_negative_seconds() -> None:
    with pytest.raises(ValueError):
        OutputPacer(capacity=4).advance(-0.01)
