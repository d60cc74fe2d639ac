"""Which call slots run each engine tick: the slot lifecycle, join/leave/abort requests, input queues.

Plain Python, no torch: the engine asks it, between ticks, what changed and which rows run.

Slot lifecycle:  FREE -> PREFILLING -> ACTIVE -> DRAINING -> FREE
    reserve()        FREE -> PREFILLING at once (so two calls never get one slot) and queues a join;
    apply_requests() hands the engine the joins to perform (persona state copy); the engine then
                     calls activate(): PREFILLING -> ACTIVE;
    request_leave()  (the caller said End) ACTIVE -> DRAINING at the next apply: the frames already
                     queued are still answered, then DRAINING -> FREE;
    request_abort()  (socket gone, error) any phase -> FREE at the next apply, queued frames dropped.
Requests may come from any thread; they take effect only in `apply_requests`, which the engine calls
between ticks, never during one. Every request carries the slot's `Lease`, so a late request of an
old call can never touch the next call in the same slot.

A slot runs a tick iff it is ACTIVE (or DRAINING) and has a caller frame queued; the other rows are
masked off and keep their state. Each slot queues at most `max_queue_frames` caller frames; a frame
beyond that pushes out the oldest one, which is counted as dropped.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class SlotPhase(StrEnum):
    FREE = "free"
    PREFILLING = "prefilling"
    ACTIVE = "active"
    DRAINING = "draining"


@dataclass(frozen=True)
class Lease:
    """One call's hold on one slot; `generation` tells successive calls of the same slot apart."""

    slot: int
    generation: int
    call_id: str


@dataclass(frozen=True)
class Join:
    """A call to load into its slot before the next tick; `payload` is the engine's own data."""

    lease: Lease
    payload: object


@dataclass(frozen=True)
class Release:
    """A slot that became FREE at this apply, with the call's counters."""

    lease: Lease
    payload: object
    aborted: bool  # True: freed by an abort; False: drained after a leave
    reason: str  # the leave's reason (e.g. "caller_hangup"), or "aborted"
    was_active: bool
    frames_in: int
    frames_run: int
    frames_dropped: int


@dataclass(frozen=True)
class Changes:
    joins: list[Join]
    releases: list[Release]


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


@dataclass
class _Slot:
    phase: SlotPhase = SlotPhase.FREE
    generation: int = 0
    lease: Lease | None = None
    payload: object = None
    leave_reason: str = ""
    queue: deque[bytes] = field(default_factory=deque)
    joined: bool = False  # the engine loaded this call's state (activate was called)
    frames_in: int = 0
    frames_run: int = 0
    frames_dropped: int = 0


class Scheduler:
    """Thread-safe slot bookkeeping for `max_slots` calls; see the module docstring."""

    def __init__(
        self,
        max_slots: int,
        max_queue_frames: int,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_queue_frames < 1:
            raise ValueError(f"max_queue_frames must be >= 1, got {max_queue_frames}")
        self.max_slots = max_slots
        self.max_queue_frames = max_queue_frames
        self._on_request = on_request
        self._lock = threading.Lock()
        self._slots = [_Slot() for _ in range(max_slots)]
        self._joins: list[Join] = []
        self._leaves: list[tuple[Lease, str]] = []
        self._aborts: list[Lease] = []
        self._frames_in = 0
        self._frames_run = 0
        self._frames_dropped = 0

    # ------------------------------------------------------------------ requests (any thread)
    def reserve(self, call_id: str, payload: object = None) -> Lease | None:
        """Take a FREE slot for a call (-> PREFILLING) and queue its join; None when all are taken."""
        with self._lock:
            for index, slot in enumerate(self._slots):
                if slot.phase is SlotPhase.FREE:
                    slot.generation += 1
                    lease = Lease(slot=index, generation=slot.generation, call_id=call_id)
                    slot.phase = SlotPhase.PREFILLING
                    slot.lease = lease
                    slot.payload = payload
                    slot.queue.clear()
                    slot.joined = False
                    slot.leave_reason = ""
                    slot.frames_in = slot.frames_run = slot.frames_dropped = 0
                    self._joins.append(Join(lease=lease, payload=payload))
                    break
            else:
                return None
        self._notify()
        return lease

    def push_frame(self, lease: Lease, frame: bytes) -> bool:
        """Queue one caller frame; False if the call no longer holds the slot or is draining.

        A full queue drops its oldest frame (counted) to make room.
        """
        with self._lock:
            slot = self._slots[lease.slot]
            if slot.lease != lease or slot.phase not in (SlotPhase.PREFILLING, SlotPhase.ACTIVE):
                return False
            slot.frames_in += 1
            self._frames_in += 1
            if len(slot.queue) >= self.max_queue_frames:
                slot.queue.popleft()
                slot.frames_dropped += 1
                self._frames_dropped += 1
            slot.queue.append(frame)
            return True

    def request_leave(self, lease: Lease, reason: str = "ended") -> None:
        """The call ended normally: answer the frames already queued, then free the slot."""
        with self._lock:
            self._leaves.append((lease, reason))
        self._notify()

    def request_abort(self, lease: Lease) -> None:
        """Free the slot at the next apply, dropping whatever is queued."""
        with self._lock:
            self._aborts.append(lease)
        self._notify()

    # ------------------------------------------------------------- engine thread, between ticks
    def apply_requests(self) -> Changes:
        """Apply queued aborts and leaves, free drained slots, and hand over the pending joins."""
        with self._lock:
            releases: list[Release] = []
            aborts, self._aborts = self._aborts, []
            leaves, self._leaves = self._leaves, []
            for lease in aborts:
                slot = self._slots[lease.slot]
                if slot.lease == lease and slot.phase is not SlotPhase.FREE:
                    releases.append(self._free(slot, aborted=True))
            for lease, reason in leaves:
                slot = self._slots[lease.slot]
                if slot.lease != lease:
                    continue
                slot.leave_reason = reason
                if slot.phase is SlotPhase.ACTIVE:
                    slot.phase = SlotPhase.DRAINING
                elif slot.phase is SlotPhase.PREFILLING:
                    slot.queue.clear()
                    releases.append(self._free(slot, aborted=False))
            for slot in self._slots:
                if slot.phase is SlotPhase.DRAINING and not slot.queue:
                    releases.append(self._free(slot, aborted=False))
            joins = [j for j in self._joins if self._holds(j.lease, SlotPhase.PREFILLING)]
            self._joins = []
            return Changes(joins=joins, releases=releases)

    def activate(self, lease: Lease) -> bool:
        """The engine loaded the call's state: PREFILLING -> ACTIVE. False if the lease is gone."""
        with self._lock:
            slot = self._slots[lease.slot]
            if slot.lease != lease or slot.phase is not SlotPhase.PREFILLING:
                return False
            slot.phase = SlotPhase.ACTIVE
            slot.joined = True
            return True

    def plan_tick(self) -> list[tuple[Lease, bytes]]:
        """Pop one caller frame for every slot that runs this tick (ACTIVE or DRAINING with a frame)."""
        plan: list[tuple[Lease, bytes]] = []
        with self._lock:
            for slot in self._slots:
                if slot.queue and slot.lease is not None and slot.phase in (SlotPhase.ACTIVE, SlotPhase.DRAINING):
                    plan.append((slot.lease, slot.queue.popleft()))
                    slot.frames_run += 1
            self._frames_run += len(plan)
        return plan

    # ------------------------------------------------------------------------------ inspection
    def phase(self, slot: int) -> SlotPhase:
        with self._lock:
            return self._slots[slot].phase

    def queued(self, slot: int) -> int:
        with self._lock:
            return len(self._slots[slot].queue)

    def leases(self) -> list[Lease]:
        """Leases of every slot that is not FREE."""
        with self._lock:
            return [s.lease for s in self._slots if s.phase is not SlotPhase.FREE and s.lease is not None]

    def stats(self) -> SchedulerStats:
        with self._lock:
            count = {phase: 0 for phase in SlotPhase}
            for slot in self._slots:
                count[slot.phase] += 1
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
    def _holds(self, lease: Lease, phase: SlotPhase) -> bool:
        slot = self._slots[lease.slot]
        return slot.lease == lease and slot.phase is phase

    def _free(self, slot: _Slot, *, aborted: bool) -> Release:
        """Caller holds the lock. Slot -> FREE; the lease stays recorded so stale requests miss."""
        lease = slot.lease
        if lease is None:  # a non-FREE slot always has a lease; keep the type checker honest
            raise RuntimeError("slot without a lease")
        release = Release(
            lease=lease,
            payload=slot.payload,
            aborted=aborted,
            reason="aborted" if aborted else slot.leave_reason,
            was_active=slot.joined,
            frames_in=slot.frames_in,
            frames_run=slot.frames_run,
            frames_dropped=slot.frames_dropped,
        )
        slot.phase = SlotPhase.FREE
        slot.payload = None
        slot.queue.clear()
        return release

    def _notify(self) -> None:
        if self._on_request is not None:
            self._on_request()
