"""Prometheus metrics of one gateway app (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.pipecat.latency import FrameLatency

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# 2.5 ms steps up to 100 ms (where the targets are: p50 <= 50, p99 <= 120), then coarser
LATENCY_BUCKETS = tuple(round(0.0025 * i, 4) for i in range(1, 41)) + (
    0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0,
)
LATENCY_SEGMENTS = ("gateway_in", "worker", "gateway_out", "total")


class _LiveCollector(Collector):
    """Values read at scrape time: active calls, and frames dropped including calls still running."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        live = self._metrics.live_stats()
        active = GaugeMetricFamily("gateway_active_calls", "Calls with a media session on this gateway")
        active.add_metric([], len(live))
        yield active
        dropped = CounterMetricFamily(
            "gateway_frames_dropped",
            "Bot 80 ms frames never played: beyond the output queue, re-synced away by the pacer, or cut "
            "whole to take out a standing delay",
        )
        dropped.add_metric([], self._metrics.frames_dropped_finished + sum(d for d in live))
        yield dropped
        lag = GaugeMetricFamily(
            "gateway_event_loop_lag_seconds",
            "The worst lateness of this gateway's event loop timers over the last few seconds: near a frame "
            "(tens of ms) the gateway is at its CPU and every call's audio suffers (app/gateway/admission.py)",
        )
        lag.add_metric([], self._metrics.loop_lag_s())
        yield lag


class GatewayMetrics:
    """Counters and histograms the gateway updates; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.calls = Counter(
            "gateway_calls",
            "Calls that ended on this gateway, by final status and end reason",
            ["status", "end_reason"],
            registry=self.registry,
        )
        self.refused = Counter(
            "gateway_refused_calls",
            "New calls refused because this gateway is at its GATEWAY_MAX_CALLS, by channel",
            ["channel"],
            registry=self.registry,
        )
        self.webhooks = Counter(
            "gateway_twilio_requests",
            "Twilio webhooks and streams by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self.bad_messages = Counter(
            "gateway_twilio_bad_messages",
            "Malformed or unknown Twilio media-stream messages (ignored)",
            registry=self.registry,
        )
        self.pickup = Histogram(
            "gateway_pickup_seconds",
            "From the media stream's start to the first bot audio pushed toward the caller",
            buckets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0),
            registry=self.registry,
        )
        self.worker_changes = Counter(
            "gateway_worker_changes",
            "Calls moved to another worker mid-call (failover or drain), by why the old one stopped serving",
            ["reason"],
            registry=self.registry,
        )
        self.worker_change_gap = Histogram(
            "gateway_worker_change_gap_seconds",
            "Caller-side silence while a call moved to another worker",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
            registry=self.registry,
        )
        self.worker_change_failures = Counter(
            "gateway_worker_change_failures",
            "Calls whose worker was lost while no other worker could take them over (ended worker_lost)",
            registry=self.registry,
        )
        self.playout_resyncs = Counter(
            "gateway_playout_resyncs",
            "Times a call's output pacer dropped bot frames to get back to its playout target (ended calls)",
            registry=self.registry,
        )
        self.playout_trimmed = Counter(
            "gateway_playout_trimmed_seconds",
            "Bot audio a call's output cut to take out a delay that stood (frames that all waited for "
            "their due time; ended calls)",
            registry=self.registry,
        )
        self.backlog_dropped = Counter(
            "gateway_backlog_dropped_frames",
            "Caller 80 ms frames left unsent because they stood in a call's send queue for a second (a worker "
            "that only just keeps real time; ended calls)",
            registry=self.registry,
        )
        self.playout_restarts = Counter(
            "gateway_playout_restarts",
            "Times a call's output pacer restarted its clock because a bot frame came too late (ended calls)",
            registry=self.registry,
        )
        self.reaped = Counter(
            "gateway_reaped_calls",
            "Open records nobody would end (their gateway died, their stream never came) ended by this gateway, "
            "by end reason",
            ["end_reason"],
            registry=self.registry,
        )
        self.added_latency = Histogram(
            "gateway_added_latency_seconds",
            "Delay the server adds to each answered caller frame beyond its 80 ms of framing, by segment: "
            "gateway_in (caller audio arrived -> frame sent to the worker), worker (sent -> bot frame back), "
            "gateway_out (back -> handed to the output transport), total",
            ["segment"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency_segments = [self.added_latency.labels(segment=s) for s in LATENCY_SEGMENTS]
        self.frames_dropped_finished = 0
        self._live: Callable[[], list[int]] = list
        self._loop_lag: Callable[[], float] = lambda: 0.0
        self.registry.register(_LiveCollector(self))

    def observe_latency(self, latency: FrameLatency) -> None:
        """One played frame's latency (PersonaPlexService's on_latency)."""
        gateway_in, worker, gateway_out, total = self._latency_segments
        gateway_in.observe(latency.gateway_in)
        worker.observe(latency.worker)
        gateway_out.observe(latency.gateway_out)
        total.observe(latency.total)

    def watch_live(self, frames_dropped_of_live_calls: Callable[[], list[int]]) -> None:
        """Where to read the live calls from: one frames-dropped count per active call."""
        self._live = frames_dropped_of_live_calls

    def watch_loop_lag(self, worst_s: Callable[[], float]) -> None:
        """Where to read the event loop's lag from (LoopLag.worst_s)."""
        self._loop_lag = worst_s

    def loop_lag_s(self) -> float:
        return self._loop_lag()

    def live_stats(self) -> list[int]:
        return self._live()

    def render(self) -> bytes:
        return generate_latest(self.registry)
