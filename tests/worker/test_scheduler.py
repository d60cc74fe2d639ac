"""The slot scheduler: lifecycle, requests applied only between ticks, bounded input queues."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from app.worker.scheduler import Lease, Scheduler, SlotPhase


def frame(i: int) -> bytes:
    return bytes([i % 256]) * 8


def joined(sched: Scheduler, call_id: str) -> Lease:
    """Reserve a slot and let the 'engine' load it (apply + activate)."""
    lease = sched.reserve(call_id)
    assert lease is not None
    changes = sched.apply_requests()
    assert [j.lease for j in changes.joins] == [lease]
    assert sched.activate(lease)
    return lease


def test_scheduler_module_does_not_need_torch() -> None:
    code = "import sys, app.worker.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reserve_takes_free_slots_then_reports_busy() -> None:
    sched = Scheduler(max_slots=2, max_queue_frames=3)
    a = sched.reserve("a")
    b = sched.reserve("b")
    assert a is not None and b is not None
    assert {a.slot, b.slot} == {0, 1}
    assert sched.phase(a.slot) is SlotPhase.PREFILLING
    assert sched.reserve("c") is None
    st = sched.stats()
    assert (st.free, st.prefilling, st.used) == (0, 2, 2)


def test_join_is_applied_between_ticks_only() -> None:
    sched = Scheduler(max_slots=2, max_queue_frames=3)
    lease = sched.reserve("a", payload="persona-x")
    assert lease is not None
    assert sched.push_frame(lease, frame(1))  # early frames are kept for when the call is loaded
    assert sched.plan_tick() == []  # not loaded yet: does not run
    changes = sched.apply_requests()
    assert [(j.lease, j.payload) for j in changes.joins] == [(lease, "persona-x")]
    assert sched.apply_requests().joins == []  # handed over once
    assert sched.plan_tick() == []  # still PREFILLING until the engine says it is loaded
    assert sched.activate(lease)
    assert sched.phase(lease.slot) is SlotPhase.ACTIVE
    assert sched.plan_tick() == [(lease, frame(1))]


def test_only_active_slots_with_a_frame_run_one_frame_per_tick() -> None:
    sched = Scheduler(max_slots=3, max_queue_frames=3)
    a, b = joined(sched, "a"), joined(sched, "b")
    pending = sched.reserve("c")
    assert pending is not None
    sched.push_frame(a, frame(1))
    sched.push_frame(a, frame(2))
    sched.push_frame(pending, frame(9))
    assert sched.plan_tick() == [(a, frame(1))]  # b has no frame, c is not loaded
    sched.push_frame(b, frame(5))
    assert sched.plan_tick() == [(a, frame(2)), (b, frame(5))]
    assert sched.plan_tick() == []
    assert sched.stats().frames_run == 3


def test_leave_drains_queued_frames_then_frees_the_slot() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    lease = joined(sched, "a")
    sched.push_frame(lease, frame(1))
    sched.push_frame(lease, frame(2))
    sched.request_leave(lease, "caller_hangup")
    assert sched.phase(0) is SlotPhase.ACTIVE  # nothing changes until the next apply
    assert sched.apply_requests().releases == []
    assert sched.phase(0) is SlotPhase.DRAINING
    assert not sched.push_frame(lease, frame(3))  # after End no new frames are taken
    assert sched.plan_tick() == [(lease, frame(1))]
    assert sched.apply_requests().releases == []
    assert sched.plan_tick() == [(lease, frame(2))]
    (release,) = sched.apply_requests().releases
    assert (release.lease, release.aborted, release.reason) == (lease, False, "caller_hangup")
    assert (release.frames_in, release.frames_run, release.frames_dropped) == (2, 2, 0)
    assert release.was_active
    assert sched.phase(0) is SlotPhase.FREE
    assert sched.reserve("b") is not None


def test_abort_drops_queued_frames_and_frees_at_the_next_apply() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    lease = joined(sched, "a")
    sched.push_frame(lease, frame(1))
    sched.request_abort(lease)
    assert sched.phase(0) is SlotPhase.ACTIVE
    (release,) = sched.apply_requests().releases
    assert release.aborted and release.reason == "aborted"
    assert sched.phase(0) is SlotPhase.FREE
    assert sched.plan_tick() == []
    assert not sched.push_frame(lease, frame(2))


def test_abort_before_the_join_is_applied_skips_the_join() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    lease = sched.reserve("a")
    assert lease is not None
    sched.request_abort(lease)
    changes = sched.apply_requests()
    assert changes.joins == []
    assert [r.lease for r in changes.releases] == [lease]
    assert not changes.releases[0].was_active
    assert not sched.activate(lease)


def test_stale_requests_of_a_previous_call_do_not_touch_the_next_one() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    old = joined(sched, "old")
    sched.request_abort(old)
    sched.apply_requests()
    new = joined(sched, "new")
    assert new.slot == old.slot and new != old
    assert not sched.push_frame(old, frame(1))
    sched.request_abort(old)
    sched.request_leave(old)
    assert sched.apply_requests().releases == []
    assert sched.phase(new.slot) is SlotPhase.ACTIVE


def test_full_queue_drops_the_oldest_frame_and_counts_it() -> None:
    sched = Scheduler(max_slots=1, max_queue_frames=3)
    lease = joined(sched, "a")
    for i in range(5):
        assert sched.push_frame(lease, frame(i))
    assert sched.queued(0) == 3
    st = sched.stats()
    assert (st.frames_in, st.frames_dropped) == (5, 2)
    assert [sched.plan_tick()[0][1] for _ in range(3)] == [frame(2), frame(3), frame(4)]
    sched.request_leave(lease)
    (release,) = sched.apply_requests().releases  # nothing left to drain: free at once
    assert (release.frames_in, release.frames_run, release.frames_dropped) == (5, 3, 2)


def test_requests_from_many_threads_get_distinct_slots_and_wake_the_engine() -> None:
    wakes = threading.Semaphore(0)
    sched = Scheduler(max_slots=8, max_queue_frames=3, on_request=wakes.release)
    leases: list[Lease | None] = []
    lock = threading.Lock()

    def caller(i: int) -> None:
        lease = sched.reserve(f"call-{i}")
        with lock:
            leases.append(lease)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [lease for lease in leases if lease is not None]
    assert len(granted) == 8 and leases.count(None) == 4
    assert sorted(lease.slot for lease in granted) == list(range(8))
    assert sum(wakes.acquire(blocking=False) for _ in range(20)) == 8  # one wake per queued join
    assert len(sched.apply_requests().joins) == 8


@pytest.mark.parametrize("bad", [{"max_slots": 0, "max_queue_frames": 1}, {"max_slots": 1, "max_queue_frames": 0}])
def test_bad_sizes_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Scheduler(**bad)
