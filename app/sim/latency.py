"""The server-added latency a gateway reports, read back from its /metrics.

The gateway observes every answered caller frame it plays into `gateway_added_latency_seconds`
(a histogram per segment: gateway_in, worker, gateway_out, total; app/pipecat/latency.py). A
snapshot is the histograms at one moment; the difference of two snapshots is the frames played
between them, so a window of a call (before a stall, during it, after it) can be told apart from
the rest. Quantiles come from the buckets as Prometheus' `histogram_quantile` computes them
(linear within a bucket), so they are as fine as the buckets: 2.5 ms up to 100 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

METRIC = "gateway_added_latency_seconds"
SEGMENTS = ("gateway_in", "worker", "gateway_out", "total")


@dataclass(frozen=True)
class LatencyHistogram:
    """One segment's histogram: cumulative counts per upper bound (the last bound is +inf)."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    sum_s: float

    @property
    def count(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def __sub__(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """The frames observed after `earlier` (a snapshot of the same histogram)."""
        if earlier.bounds != self.bounds:
            raise ValueError("histograms with different buckets cannot be subtracted")
        cumulative = tuple(now - then for now, then in zip(self.cumulative, earlier.cumulative, strict=True))
        if any(c < 0 for c in cumulative):
            raise ValueError("the later snapshot has fewer frames: the gateway restarted in between")
        return LatencyHistogram(self.bounds, cumulative, self.sum_s - earlier.sum_s)

    def mean(self) -> float | None:
        return self.sum_s / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """Seconds below which a fraction `q` of the frames fell (None without frames); a
        quantile in the +inf bucket is the highest finite bound, as in Prometheus."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is not within [0, 1]")
        if not self.count:
            return None
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative >= rank and cumulative > lower_count:
                if math.isinf(bound):
                    return lower_bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (cumulative - lower_count)
            lower_bound, lower_count = bound, cumulative
        return lower_bound

    def summary_ms(self) -> dict[str, float | None]:
        """frames, mean, p50, p95, p99 and the upper bound of the highest non-empty bucket, in ms."""

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 1)

        return {
            "frames": self.count,
            "mean_ms": ms(self.mean()),
            "p50_ms": ms(self.quantile(0.50)),
            "p95_ms": ms(self.quantile(0.95)),
            "p99_ms": ms(self.quantile(0.99)),
            "max_bucket_ms": ms(self.max_bound()),
        }

    def max_bound(self) -> float | None:
        """The upper bound of the highest bucket holding a frame (inf beyond the last finite one)."""
        previous = 0.0
        highest = None
        for bound, cumulative in zip(self.bounds, self.cumulative, strict=True):
            if cumulative > previous:
                highest = bound
            previous = cumulative
        return highest


LatencySnapshot = dict[str, LatencyHistogram]  # segment -> histogram


def parse_latency(metrics_text: str) -> LatencySnapshot:
    """The gateway's latency histograms from its /metrics text (missing segments: ValueError)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != METRIC:
            continue
        for sample in family.samples:
            segment = sample.labels.get("segment")
            if segment is None:
                continue
            if sample.name == f"{METRIC}_bucket":
                buckets.setdefault(segment, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name == f"{METRIC}_sum":
                sums[segment] = sample.value
    missing = [s for s in SEGMENTS if s not in buckets]
    if missing:
        raise ValueError(f"{METRIC} has no {', '.join(missing)} in these metrics")
    snapshot: LatencySnapshot = {}
    for segment, pairs in buckets.items():
        pairs.sort()
        snapshot[segment] = LatencyHistogram(
            tuple(b for b, _ in pairs), tuple(c for _, c in pairs), sums.get(segment, 0.0)
        )
    return snapshot


def window(later: LatencySnapshot, earlier: LatencySnapshot) -> LatencySnapshot:
    """The frames played between two snapshots, per segment."""
    return {segment: later[segment] - earlier[segment] for segment in SEGMENTS}


async def scrape_latency(http: httpx.AsyncClient, gateway_url: str) -> LatencySnapshot:
    response = await http.get(f"{gateway_url.rstrip('/')}/metrics")
    response.raise_for_status()
    return parse_latency(response.text)
