"""Which call slots run each engine tick: the slot lifecycle, join/leave/abort requests, input queues.

Plain Python, no torch: the engine asks it, between ticks, what changed and which rows run.

The slot table (`max_slots` entries, each a `Call` record or None) is the one place that says which
call holds which slot. Each call's own lifecycle (`Call.phase`, see `call.py`):
FREE -> PREFILLING -> ACTIVE -> DRAINING -> FREE
    reserve()        FREE -> PREFILLING at once (so two calls never get one slot) and queues a join;
    apply_requests() hands the engine the joins to perform (persona state copy); the engine then
                     calls activate(): PREFILLING -> ACTIVE;
    request_leave()  (the caller said End) ACTIVE -> DRAINING at the next apply: the frames already
                     queued are still answered, then DRAINING -> FREE;
    request_abort()  (socket gone, error) any phase -> FREE at the next apply, queued frames dropped.
Requests may come from any thread; they take effect only in `apply_requests`, which the engine calls
between ticks, never during one. Every request carries the call's record and is applied only while
its slot still holds that very record, so a late request of an old call can never touch the next
call in the same slot. A released record keeps its counters, reason and `aborted` for the engine.

A slot runs a tick iff its call is ACTIVE (or DRAINING) and has a caller frame queued; the other rows
are masked off and keep their state. Each call queues at most `max_queue_frames` caller frames; a
frame beyond that pushes out the oldest one, which is counted as dropped. Each queued frame keeps
the time it arrived (`clock`, time.monotonic by default); `plan_tick` sets `Call.wait_s`, how long
the frame it hands the engine waited for its tick (the worker reports it: `protocol.Timing`).
`behind` tells the engine, after a tick, that a running call has fallen behind its tick grid (it
then runs the next tick at once instead of waiting for the grid).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.worker.call import Call, SlotPhase

_RUNS = (SlotPhase.ACTIVE, SlotPhase.DRAINING)
CATCH_UP_BACKLOG = 2  # caller frames queued in one slot right after a tick: it has fallen behind


@dataclass(frozen=True)
class Changes:
    joins: list[Call]  # calls to load into their slots before the next tick
    releases: list[Call]  # calls whose slot became FREE at this apply


@dataclass(frozen=True)
class SchedulerStats:
    max_slots: int
    free: int
    prefilling: int
    active: int
    draining: int
    frames_in: int
    frames_run: int
    frames_dropped: int

    @property
    def used(self) -> int:
        return self.max_slots - self.free


class Scheduler:
    """Thread-safe slot bookkeeping for `max_slots` calls; see the module docstring."""

    def __init__(
        self,
        max_slots: int,
        max_queue_frames: int,
        on_request: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_queue_frames < 1:
            raise ValueError(f"max_queue_frames must be >= 1, got {max_queue_frames}")
        self.max_slots = max_slots
        self.max_queue_frames = max_queue_frames
        self._on_request = on_request
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: list[Call | None] = [None] * max_slots
        self._joins: list[Call] = []
        self._leaves: list[tuple[Call, str]] = []
        self._aborts: list[Call] = []
        self._frames_in = 0
        self._frames_run = 0
        self._planned: list[Call] = []  # the calls of the last plan_tick
        self._frames_dropped = 0

    # ------------------------------------------------------------------ requests (any thread)
    def reserve(self, call: Call) -> bool:
        """Give a new call a FREE slot (-> PREFILLING) and queue its join; False when all are taken."""
        with self._lock:
            if call.slot >= 0:
                raise ValueError(f"call {call.call_id} already held slot {call.slot}: a record is reserved once")
            if None not in self._slots:
                return False
            call.slot = self._slots.index(None)
            call.phase = SlotPhase.PREFILLING
            self._slots[call.slot] = call
            self._joins.append(call)
        self._notify()
        return True

    def push_frame(self, call: Call, frame: bytes) -> bool:
        """Queue one caller frame; False if the call no longer holds its slot or is draining.

        A full queue drops its oldest frame (counted) to make room.
        """
        with self._lock:
            if not self._holds(call, SlotPhase.PREFILLING, SlotPhase.ACTIVE):
                return False
            call.frames_in += 1
            self._frames_in += 1
            if len(call.queue) >= self.max_queue_frames:
                call.queue.popleft()
                call.frames_dropped += 1
                self._frames_dropped += 1
            call.queue.append((frame, self._clock()))
            return True

    def request_leave(self, call: Call, reason: str = "ended") -> None:
        """The call ended normally: answer the frames already queued, then free the slot."""
        with self._lock:
            self._leaves.append((call, reason))
        self._notify()

    def request_abort(self, call: Call) -> None:
        """Free the slot at the next apply, dropping whatever is queued."""
        with self._lock:
            self._aborts.append(call)
        self._notify()

    # ------------------------------------------------------------- engine thread, between ticks
    def apply_requests(self) -> Changes:
        """Apply queued aborts and leaves, free drained slots, and hand over the pending joins."""
        with self._lock:
            releases: list[Call] = []
            aborts, self._aborts = self._aborts, []
            leaves, self._leaves = self._leaves, []
            for call in aborts:
                if self._holds(call):
                    releases.append(self._free(call, aborted=True))
            for call, reason in leaves:
                if not self._holds(call):
                    continue
                call.reason = reason
                if call.phase is SlotPhase.ACTIVE:
                    call.phase = SlotPhase.DRAINING
                elif call.phase is SlotPhase.PREFILLING:
                    releases.append(self._free(call, aborted=False))
            for held in self._slots:
                if held is not None and held.phase is SlotPhase.DRAINING and not held.queue:
                    releases.append(self._free(held, aborted=False))
            joins = [call for call in self._joins if self._holds(call, SlotPhase.PREFILLING)]
            self._joins = []
            return Changes(joins=joins, releases=releases)

    def activate(self, call: Call) -> bool:
        """The engine loaded the call's state: PREFILLING -> ACTIVE. False if the call left meanwhile."""
        with self._lock:
            if not self._holds(call, SlotPhase.PREFILLING):
                return False
            call.phase = SlotPhase.ACTIVE
            call.joined = True
            return True

    def plan_tick(self) -> list[tuple[Call, bytes]]:
        """Pop one caller frame for every slot that runs this tick (ACTIVE or DRAINING with a frame);
        each such call's `wait_s` says how long that frame waited."""
        plan: list[tuple[Call, bytes]] = []
        with self._lock:
            now = self._clock()
            for call in self._slots:
                if call is not None and call.queue and call.phase in _RUNS:
                    frame, arrived = call.queue.popleft()
                    call.wait_s = now - arrived
                    plan.append((call, frame))
                    call.frames_run += 1
            self._frames_run += len(plan)
            self._planned = [call for call, _ in plan]
        return plan

    def behind(self, period_s: float) -> bool:
        """Whether a running call has fallen behind the tick grid of period `period_s`, checked
        right after a tick: CATCH_UP_BACKLOG or more of its frames are queued, or one is queued
        behind the frame it ran in the last tick and that frame had waited more than a whole
        period. That is a frame standing in the queue since a stall: on the grid alone every later
        frame would wait a tick longer than it needs (a frame that came a little late for a tick
        waits less than a period, and is left for the grid)."""
        with self._lock:
            running = [c for c in self._slots if c is not None and c.phase in _RUNS and c.queue]
            if any(len(c.queue) >= CATCH_UP_BACKLOG for c in running):
                return True
            planned = {id(c) for c in self._planned}
            return any(id(c) in planned and c.wait_s > period_s for c in running)

    # ------------------------------------------------------------------------------ inspection
    def holds(self, call: Call) -> bool:
        """Whether the call still holds its slot (it was reserved and not yet released)."""
        with self._lock:
            return self._holds(call)

    def calls(self, *phases: SlotPhase) -> list[Call]:
        """The calls holding a slot, in slot order; only those in `phases` when given."""
        with self._lock:
            return [c for c in self._slots if c is not None and (not phases or c.phase in phases)]

    def phase(self, slot: int) -> SlotPhase:
        with self._lock:
            call = self._slots[slot]
            return SlotPhase.FREE if call is None else call.phase

    def backlog(self) -> int:
        """The most caller frames queued in one running slot (ACTIVE or DRAINING)."""
        with self._lock:
            return max((len(c.queue) for c in self._slots if c is not None and c.phase in _RUNS), default=0)

    def queued(self, slot: int) -> int:
        with self._lock:
            call = self._slots[slot]
            return 0 if call is None else len(call.queue)

    def stats(self) -> SchedulerStats:
        with self._lock:
            count = {phase: 0 for phase in SlotPhase}
            for call in self._slots:
                count[SlotPhase.FREE if call is None else call.phase] += 1
            return SchedulerStats(
                max_slots=self.max_slots,
                free=count[SlotPhase.FREE],
                prefilling=count[SlotPhase.PREFILLING],
                active=count[SlotPhase.ACTIVE],
                draining=count[SlotPhase.DRAINING],
                frames_in=self._frames_in,
                frames_run=self._frames_run,
                frames_dropped=self._frames_dropped,
            )

    # -------------------------------------------------------------------------------- internal
    def _holds(self, call: Call, *phases: SlotPhase) -> bool:
        """Caller holds the lock. The slot holds this very record (in one of `phases` when given)."""
        held = 0 <= call.slot < self.max_slots and self._slots[call.slot] is call
        return held and (not phases or call.phase in phases)

    def _free(self, call: Call, *, aborted: bool) -> Call:
        """Caller holds the lock. The call leaves its slot (-> FREE); the record keeps its counters."""
        self._slots[call.slot] = None
        call.phase = SlotPhase.FREE
        call.aborted = aborted
        if aborted:
            call.reason = "aborted"
        call.queue.clear()
        return call

    def _notify(self) -> None:
        if self._on_request is not None:
            self._on_request()
