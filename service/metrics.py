"""What the service counts, and /metrics: its counters as Prometheus metrics.

The hot path only increments plain integers in Stats (and OutputStats, and the tail hub's
counters). At each scrape, collectors (prometheus_client's custom-collector interface) read
them into metric families: IngestMetrics here, OutputMetrics (service/outputs/metrics.py)
and TailMetrics (tail/hub.py). make_app registers them in the service's CollectorRegistry,
and prometheus_client writes /metrics from it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(slots=True)
class Lag:
    """Histogram of end-to-end lag, per batch: its oldest event's time (on its host) to the
    batch handled by the service."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LAG_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


@dataclass(slots=True)
class CollectorInfo:
    host: str = ""
    last_seq: int = -1
    spool_bytes: int = 0
    held_batches: int = 0
    last_seen: float = 0.0  # wall clock of its last batch


@dataclass(slots=True)
class Stats:
    events_in: Counter[str] = field(default_factory=Counter)  # per host
    batches: Counter[str] = field(default_factory=Counter)  # accepted, replayed, rejected
    alerts: Counter[str] = field(default_factory=Counter)  # per rule id
    rejected: Counter[str] = field(default_factory=Counter)  # per reason
    collector_lost: Counter[tuple[str, str]] = field(default_factory=Counter)  # (host, cause)
    collectors: dict[str, CollectorInfo] = field(default_factory=dict)
    lag: Lag = field(default_factory=Lag)
    orders: Counter[str] = field(default_factory=Counter)  # response orders sent, per action


class IngestMetrics(Collector):
    """The service's own counters (Stats) as metric families."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        counters = (
            ("sandtrace_events_received", "Events received, per host", "host", stats.events_in),
            ("sandtrace_batches", "Batches, per result", "result", stats.batches),
            ("sandtrace_alerts", "Alerts raised, per rule", "rule", stats.alerts),
            ("sandtrace_rejected", "Batches rejected, per reason", "reason", stats.rejected),
            ("sandtrace_orders", "Response orders sent, per action", "action", stats.orders),
        )
        for name, help_text, label, counter in counters:
            family = CounterMetricFamily(name, help_text, labels=[label])
            for key, value in sorted(counter.items()):
                family.add_metric([key], value)
            yield family
        lost = CounterMetricFamily(
            "sandtrace_collector_lost",
            "Events collectors lost before the service got them, per host and cause "
            "(kernel ring, user queue, map_error, spool)",
            labels=["host", "cause"],
        )
        for (host, cause), value in sorted(stats.collector_lost.items()):
            lost.add_metric([host, cause], value)
        yield lost
        collectors = sorted(stats.collectors.items())
        gauges = (
            ("sandtrace_collector_spool_bytes", "Bytes in each collector's disk spool"),
            (
                "sandtrace_collector_held_batches",
                "Batches each collector holds for the service (memory and spool)",
            ),
            ("sandtrace_collector_last_seq", "Last batch handled, per collector"),
            ("sandtrace_collector_last_seen_seconds", "Wall clock of each collector's last batch"),
        )
        families = [GaugeMetricFamily(n, h, labels=["collector", "host"]) for n, h in gauges]
        spool, held, last_seq, last_seen = families
        for cid, info in collectors:
            spool.add_metric([cid, info.host], info.spool_bytes)
            held.add_metric([cid, info.host], info.held_batches)
            last_seq.add_metric([cid, info.host], info.last_seq)
            last_seen.add_metric([cid, info.host], round(info.last_seen, 3))
        yield from families
        lag = stats.lag
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*LAG_BUCKETS, math.inf), lag.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else f"{bound:g}", cumulative))
        yield HistogramMetricFamily(
            "sandtrace_batch_lag_seconds",
            "Age of each batch's oldest event when the service has handled the batch",
            buckets=buckets,
            sum_value=round(lag.total, 6),
        )


def exposition(*collectors: Collector) -> str:
    """The Prometheus text format of what these collectors collect, as /metrics shows it
    (for tests and for a single part's counters; the service writes its registry's)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    return generate_latest(registry).decode()
