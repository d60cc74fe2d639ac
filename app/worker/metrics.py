"""Prometheus metrics of one worker, in a registry of its own (never the process-global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TICK_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0)
PREFILL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class WorkerMetrics:
    """Counters and gauges the engine and the server update (prometheus-client is thread-safe)."""

    def __init__(self, max_slots: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ticks = Counter("worker_ticks", "Engine ticks run", registry=r)
        self.busy_ticks = Counter("worker_busy_ticks", "Engine ticks with at least one slot running", registry=r)
        self.tick_seconds = Histogram(
            "worker_tick_seconds", "Duration of busy ticks (Mimi encode, LM step, Mimi decode)",
            buckets=TICK_BUCKETS, registry=r,
        )
        self.overruns = Counter("worker_tick_overruns", "Ticks that ran past their 80 ms slot", registry=r)
        self.catch_ups = Counter(
            "worker_tick_catch_ups", "Ticks run at once, off the 80 ms grid, because a slot had fallen behind",
            registry=r,
        )
        self.tick_errors = Counter("worker_tick_errors", "Ticks that raised (the calls in them were ended)", registry=r)
        self.max_slots = Gauge("worker_max_slots", "Call slots of this worker", registry=r)
        self.max_slots.set(max_slots)
        self.active_slots = Gauge("worker_active_slots", "Slots holding a call (not free)", registry=r)
        self.frames_in = Counter("worker_frames_in", "Caller audio frames received", registry=r)
        self.frames_out = Counter("worker_frames_out", "Bot audio frames produced", registry=r)
        self.frames_dropped = Counter(
            "worker_frames_dropped", "Caller frames dropped because a slot's input queue was full", registry=r
        )
        self.output_dropped = Counter(
            "worker_output_dropped", "Bot messages dropped because a session did not read them", registry=r
        )
        self.prefill_seconds = Histogram(
            "worker_prefill_seconds", "Time to load a persona's state into a slot", buckets=PREFILL_BUCKETS, registry=r
        )
        self.sessions = Counter("worker_sessions", "Sessions by outcome", ["outcome"], registry=r)
        self.rebuilds = Counter(
            "worker_context_rebuilds", "Long calls' contexts rebuilt (persona + last frames): spread over ticks, "
            "or forced at once because the window's limit came first", ["outcome"], registry=r,
        )
        self.rebuild_seconds = Histogram(
            "worker_context_rebuild_seconds", "Prefill time of one context rebuild, all its chunks",
            buckets=PREFILL_BUCKETS, registry=r,
        )
        self.rebuild_chunk_seconds = Histogram(
            "worker_context_rebuild_chunk_seconds", "Prefill time of one rebuild chunk (between two ticks)",
            buckets=PREFILL_BUCKETS, registry=r,
        )

    def render(self) -> bytes:
        """The text exposition format of this registry."""
        return generate_latest(self.registry)
