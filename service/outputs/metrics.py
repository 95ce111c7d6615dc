"""The outputs' counters (OutputStats) as Prometheus metric families, read at each scrape."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.metrics import exposition
from service.outputs.base import DROP_CAUSES, Output


class OutputMetrics(Collector):
    """Items sent, dropped (per cause; the known causes always shown) and retried, and the
    queue depth, of each output."""

    def __init__(self, outputs: Sequence[Output]) -> None:
        self.outputs = outputs

    def collect(self) -> Iterator[Metric]:
        outputs = self.outputs
        sent = CounterMetricFamily(
            "sandtrace_output_sent", "Items delivered, per output", labels=["output"]
        )
        for o in outputs:
            sent.add_metric([o.name], o.stats.sent)
        yield sent
        dropped = CounterMetricFamily(
            "sandtrace_output_dropped",
            "Items lost, per output and cause",
            labels=["output", "cause"],
        )
        for o in outputs:
            for cause in sorted(set(DROP_CAUSES) | set(o.stats.dropped)):
                dropped.add_metric([o.name, cause], o.stats.dropped[cause])
        yield dropped
        retries = CounterMetricFamily(
            "sandtrace_output_retries", "Failed deliveries retried, per output", labels=["output"]
        )
        for o in outputs:
            retries.add_metric([o.name], o.stats.retries)
        yield retries
        queue = GaugeMetricFamily(
            "sandtrace_output_queue", "Items waiting or in delivery, per output", labels=["output"]
        )
        for o in outputs:
            queue.add_metric([o.name], o.depth())
        yield queue


def prometheus_lines(outputs: Sequence[Output]) -> list[str]:
    """The lines /metrics shows for these outputs (HELP, TYPE and samples)."""
    return exposition(OutputMetrics(outputs)).splitlines()
