"""The slot scheduler: lifecycle, requests applied only between ticks, bounded input queues; a call's
record is its handle, so a stale request is told apart by identity."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from app.protocol import CallHistory, Sampling
from app.worker.call import Call, SlotPhase
from app.worker.scheduler import Scheduler


def frame(i: int) -> bytes:
    return bytes([i % 256]) * 8


def record(call_id: str, persona_id: str = "p") -> Call:
    return Call(call_id, persona_id, Sampling(), sink=lambda item: None, history=CallHistory(16))


def reserved(sched: Scheduler, call_id: str, persona_id: str = "p") -> Call:
    call = record(call_id, persona_id)
    assert sched.reserve(call)
    return call


def joined(sched: Scheduler, call_id: str) -> Call:
    """Reserve a slot and let the 'engine' load it (apply + activate)."""
    call = reserved(sched, call_id)
    changes = sched.apply_requests()
    assert changes.joins == [call]
    assert sched.activate(call)
    return call


def test_scheduler_module_does_not_need_torch() -> None:
    code = "import sys, app.worker.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reserve_takes_free_slots_then_reports_busy() -> None:
    sched = Scheduler(max_slots=2, max_queue_frames=3)
    a = reserved(sched, "a")
    b = reserved(sched, "b")
    assert {a.slot, b.slot} == {0, 1}
    assert sched.phase(a.slot) is SlotPhase.PREFILLING and a.phase is SlotPhase.PREFILLING
    c = record("c")
    assert not sched.reserve(c) and c.phase is SlotPhase.FREE
    assert sched.calls() == [a, b]
    st = sched.stats()
    assert (st.free, st.prefilling, st.used) == (0, 2, 2)


def test_join_is_applied_between_ticks_only() -> None:
    sched = Scheduler(max_slots=2, max_queue_frames=3)
    call = reserved(sched, "a", persona_id="persona-x")
    assert sched.push_frame(call, frame(1))  # early frames are kept for when the call is loaded
    assert sched.plan_tick() == []  # not loaded yet: does not run
    (join,) = sched.apply_requests().joins
    assert join is call and join.persona_id == "persona-x"
    assert sched.apply_requests().joins == []  # handed over once
    assert sched.plan_tick() == []  # still PREFILLING until the engine says it is loaded
    assert sched.activate(call)
    assert sched.phase(call.slot) is SlotPhase.ACTIVE
    assert sched.plan_tick() == [(call, frame(1))]


def test_only_active_slots_with_a_frame_run_one_frame_per_tick() -> None:
    sched = Scheduler(max_slots=3, max_queue_frames=3)
    a, b = joined(sched, "a"), joined(sched, "b")
    pending = reserved(sched, "c")
    sched.push_frame(a, frame(1))
    sched.push_frame(a, frame(2))
    sched.push_frame(pending, frame(9))
    assert sched.plan_tick() == [(a, frame(1))]  # b has no frame, c is not loaded
    sched.push_frame(b, frame(5))
    assert sched.plan_tick() == [(a, frame(2)), (b, frame(5))]
    assert sched.plan_tick() == []
    assert sched.stats().frames_run == 3
    assert sched.calls(SlotPhase.ACTIVE, SlotPhase.DRAINING) == [a, b]


def test_leave_drains_queued_frames_then_frees_the_slot() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    call = joined(sched, "a")
    sched.push_frame(call, frame(1))
    sched.push_frame(call, frame(2))
    sched.request_leave(call, "caller_hangup")
    assert sched.phase(0) is SlotPhase.ACTIVE  # nothing changes until the next apply
    assert sched.apply_requests().releases == []
    assert sched.phase(0) is SlotPhase.DRAINING
    assert not sched.push_frame(call, frame(3))  # after End no new frames are taken
    assert sched.plan_tick() == [(call, frame(1))]
    assert sched.apply_requests().releases == []
    assert sched.plan_tick() == [(call, frame(2))]
    (release,) = sched.apply_requests().releases
    assert release is call and (release.aborted, release.reason) == (False, "caller_hangup")
    assert (release.frames_in, release.frames_run, release.frames_dropped) == (2, 2, 0)
    assert release.joined
    assert sched.phase(0) is SlotPhase.FREE and call.phase is SlotPhase.FREE
    assert not sched.holds(call)
    assert sched.reserve(record("b"))


def test_abort_drops_queued_frames_and_frees_at_the_next_apply() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    call = joined(sched, "a")
    sched.push_frame(call, frame(1))
    sched.request_abort(call)
    assert sched.phase(0) is SlotPhase.ACTIVE
    (release,) = sched.apply_requests().releases
    assert release is call and release.aborted and release.reason == "aborted"
    assert sched.phase(0) is SlotPhase.FREE and not call.queue
    assert sched.plan_tick() == []
    assert not sched.push_frame(call, frame(2))


def test_abort_before_the_join_is_applied_skips_the_join() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    call = reserved(sched, "a")
    sched.request_abort(call)
    changes = sched.apply_requests()
    assert changes.joins == []
    assert changes.releases == [call]
    assert not changes.releases[0].joined
    assert not sched.activate(call)


def test_stale_requests_of_a_previous_call_do_not_touch_the_next_one() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    old = joined(sched, "old")
    sched.push_frame(old, frame(0))
    sched.request_abort(old)
    sched.apply_requests()
    new = joined(sched, "new")
    assert new.slot == old.slot and new is not old and new != old  # identity tells them apart
    assert not sched.push_frame(old, frame(1))
    assert not sched.activate(old)
    sched.request_abort(old)
    sched.request_leave(old)
    assert sched.apply_requests().releases == []
    assert sched.phase(new.slot) is SlotPhase.ACTIVE
    assert (new.frames_in, new.reason, old.frames_in, old.reason) == (0, "", 1, "aborted")
    assert sched.holds(new) and not sched.holds(old)


def test_a_record_is_reserved_once() -> None:
    sched = Scheduler(max_slots=2, max_queue_frames=3)
    call = joined(sched, "a")
    with pytest.raises(ValueError):
        sched.reserve(call)
    sched.request_abort(call)
    sched.apply_requests()
    with pytest.raises(ValueError):  # not even once it left: a late request could then touch it
        sched.reserve(call)


def test_full_queue_drops_the_oldest_frame_and_counts_it() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    call = joined(sched, "a")
    for i in range(5):
        assert sched.push_frame(call, frame(i))
    assert sched.queued(0) == 3
    st = sched.stats()
    assert (st.frames_in, st.frames_dropped) == (5, 2)
    assert [sched.plan_tick()[0][1] for _ in range(3)] == [frame(2), frame(3), frame(4)]
    sched.request_leave(call)
    (release,) = sched.apply_requests().releases  # nothing left to drain: free at once
    assert (release.frames_in, release.frames_run, release.frames_dropped) == (5, 3, 2)


def test_requests_from_many_threads_get_distinct_slots_and_wake_the_engine() -> None:
    wakes = threading.Semaphore(0)
    sched = Scheduler(max_slots=8, max_queue_frames=3, on_request=wakes.release)
    granted: list[Call] = []
    refused: list[Call] = []
    lock = threading.Lock()

    def caller(i: int) -> None:
        call = record(f"call-{i}")
        ok = sched.reserve(call)
        with lock:
            (granted if ok else refused).append(call)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 8 and len(refused) == 4
    assert sorted(call.slot for call in granted) == list(range(8))
    assert all(call.slot == -1 for call in refused)
    assert sum(wakes.acquire(blocking=False) for _ in range(20)) == 8  # one wake per queued join
    assert len(sched.apply_requests().joins) == 8


@pytest.mark.parametrize("bad", [{"max_slots": 0, "max_queue_frames": 1}, {"max_slots": 1, "max_queue_frames": 0}])
def test_bad_sizes_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Scheduler(**bad)


def test_backlog_is_the_longest_queue_of_a_running_call() -> None:
    """What the engine reads after each tick to decide whether to catch up off the grid: only
    calls that run count (a call still loading may queue frames without being behind)."""
    sched = Scheduler(max_slots=3, max_queue_frames=8)
    assert sched.backlog() == 0
    a, b = joined(sched, "a"), joined(sched, "b")
    loading = reserved(sched, "loading")
    for i in range(5):
        sched.push_frame(loading, frame(i))
    sched.push_frame(a, frame(0))
    for i in range(3):
        sched.push_frame(b, frame(i))
    assert sched.backlog() == 3
    sched.plan_tick()
    assert sched.backlog() == 2
    sched.plan_tick()
    sched.plan_tick()
    assert sched.backlog() == 0


def test_a_planned_frame_says_how_long_it_waited_in_its_queue() -> None:
    """The worker reports each caller frame's wait for its tick (protocol.Timing): the scheduler
    stamps a frame when it arrives and `plan_tick` sets the call's `wait_s` from that stamp."""
    now = [100.0]
    sched = Scheduler(max_slots=2, max_queue_frames=4, clock=lambda: now[0])
    a, b = joined(sched, "a"), joined(sched, "b")
    sched.push_frame(a, frame(1))
    now[0] += 0.030
    sched.push_frame(b, frame(2))
    sched.push_frame(a, frame(3))
    now[0] += 0.050
    assert sched.plan_tick() == [(a, frame(1)), (b, frame(2))]
    assert a.wait_s == pytest.approx(0.080) and b.wait_s == pytest.approx(0.050)
    now[0] += 0.010
    assert sched.plan_tick() == [(a, frame(3))]
    assert a.wait_s == pytest.approx(0.060)  # the second frame's own stamp, not the first's


def test_a_call_is_behind_with_two_frames_queued_or_one_standing_behind_a_frame_that_waited_a_tick() -> None:
    """What the engine reads after each tick to decide whether to catch up off the grid (0.08 s
    grid). A frame that came a little late for a tick is left for the next grid point; a frame
    queued behind one that had waited more than a whole tick is a standing delay, caught up."""
    now = [0.0]
    sched = Scheduler(max_slots=2, max_queue_frames=8, clock=lambda: now[0])
    a = joined(sched, "a")
    period = 0.08
    assert not sched.behind(period)

    sched.push_frame(a, frame(0))  # on time: 10 ms before the tick
    now[0] += 0.010
    sched.plan_tick()
    now[0] += 0.030  # the tick runs; a frame comes during it (late for this tick)
    sched.push_frame(a, frame(1))
    assert not sched.behind(period)  # the grid takes it: it waits less than a period

    now[0] += 0.045  # the next grid point: frame 1 waited 45 + ~5 ms; frame 2 arrived before it
    sched.push_frame(a, frame(2))
    sched.push_frame(a, frame(3))
    sched.plan_tick()
    assert sched.backlog() == 2 and sched.behind(period)  # two queued: behind

    sched.plan_tick()  # frame 2 (it waited ~0); frame 3, which came with it, stays queued
    assert sched.backlog() == 1 and not sched.behind(period)
    now[0] += 0.081
    sched.push_frame(a, frame(4))  # the next frame comes before the grid point
    sched.plan_tick()  # frame 3 waited more than a period, and frame 4 stands behind it
    assert sched.backlog() == 1 and sched.behind(period)
    sched.plan_tick()  # the catch-up tick: nothing queued
    assert not sched.behind(period)
