"""Reading the gateway's per-frame latency back from its real /metrics output."""

from __future__ import annotations

import numpy as np
import pytest

from app.gateway.metrics import GatewayMetrics
from app.pipecat.latency import FrameLatency
from app.sim.latency import SEGMENTS, parse_latency, window


def observe(metrics: GatewayMetrics, totals_ms: np.ndarray) -> None:
    for total in totals_ms:
        metrics.observe_latency(FrameLatency(gateway_in=0.002, worker=total / 1000 - 0.012, gateway_out=0.010))


def test_quantiles_of_a_window_match_the_frames_played_in_it_to_a_bucket() -> None:
    metrics = GatewayMetrics()
    rng = np.random.default_rng(1)
    before = rng.uniform(20, 60, 400)  # ms
    after = rng.uniform(60, 95, 300)
    observe(metrics, before)
    first = parse_latency(metrics.render().decode())
    observe(metrics, after)
    second = parse_latency(metrics.render().decode())

    assert set(first) == set(SEGMENTS)
    assert first["total"].count == 400 and second["total"].count == 700
    later = window(second, first)["total"]
    assert later.count == 300
    assert later.mean() == pytest.approx(after.mean() / 1000, rel=1e-6)
    for q in (0.5, 0.95, 0.99):  # the buckets are 2.5 ms wide here
        assert abs(later.quantile(q) * 1000 - np.quantile(after, q)) < 2.5
    assert abs(first["total"].quantile(0.5) * 1000 - np.median(before)) < 2.5
    assert window(second, first)["gateway_in"].summary_ms()["p50_ms"] == pytest.approx(2.0, abs=2.5)
    assert later.max_bound() == pytest.approx(np.ceil(after.max() / 2.5) * 2.5 / 1000)


def test_a_frame_beyond_the_last_bucket_reads_as_the_last_bound_and_empty_windows_as_none() -> None:
    metrics = GatewayMetrics()
    empty = parse_latency(metrics.render().decode())
    assert empty["total"].quantile(0.5) is None and empty["total"].summary_ms()["frames"] == 0
    observe(metrics, np.array([5000.0]))  # 5 s: beyond the 2 s bucket
    one = parse_latency(metrics.render().decode())["total"]
    assert one.quantile(0.99) == 2.0 and one.max_bound() == float("inf")
    with pytest.raises(ValueError, match="restarted"):
        empty["total"] - one
    with pytest.raises(ValueError, match="within"):
        one.quantile(1.5)


def test_metrics_without_the_latency_histogram_are_refused() -> None:
    with pytest.raises(ValueError, match="gateway_added_latency_seconds has no"):
        parse_latency("# HELP other_total x\n# TYPE other_total counter\nother_total 1.0\n")
