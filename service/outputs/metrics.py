"""The outputs' counters (OutputStats) in the Prometheus text exposition format."""

from __future__ import annotations

from collections.abc import Sequence

from service.outputs.base import DROP_CAUSES, Output


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_lines(outputs: Sequence[Output]) -> list[str]:
    """Prometheus text exposition lines (HELP, TYPE and samples) of every output's stats."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("sandtrace_output_sent_total", "counter", "Items delivered, per output")
    for o in outputs:
        lines.append(f'sandtrace_output_sent_total{{output="{_label(o.name)}"}} {o.stats.sent}')
    family("sandtrace_output_dropped_total", "counter", "Items lost, per output and cause")
    for o in outputs:
        for cause in sorted(set(DROP_CAUSES) | set(o.stats.dropped)):
            lines.append(
                f'sandtrace_output_dropped_total{{output="{_label(o.name)}",'
                f'cause="{_label(cause)}"}} {o.stats.dropped[cause]}'
            )
    family("sandtrace_output_retries_total", "counter", "Failed deliveries retried, per output")
    for o in outputs:
        lines.append(
            f'sandtrace_output_retries_total{{output="{_label(o.name)}"}} {o.stats.retries}'
        )
    family("sandtrace_output_queue", "gauge", "Items waiting or in delivery, per output")
    for o in outputs:
        lines.append(f'sandtrace_output_queue{{output="{_label(o.name)}"}} {o.depth()}')
    return lines
