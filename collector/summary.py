"""What a `sandtrace run` did, in brief: alerts by level and rule, the executables it ran, the
destinations it contacted and what was lost; said on stderr at the end, and as JSON.

RunSummary is a sink of the run's pipeline (collector.pipeline.Sink): it sees every event and
alert the terminal sees, and keeps counts only, so its memory grows with the number of
distinct executables, destinations and rules, not with the events.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import IO, Any, TypeVar

from api.events import (
    Alert,
    AnyEvent,
    ConnectEvent,
    DnsEvent,
    ExecEvent,
    LostEvent,
    bytes_text,
    text_bytes,
)
from api.render import escape
from collector.dns import SPLIT

LEVELS = ("critical", "high", "medium", "low", "informational")
SHOWN = 10  # rows per list on the terminal; the JSON has them all
K = TypeVar("K")


def _text(value: bytes) -> str:
    """A bytes field as json_line() writes it (escaped text: api.events.bytes_text)."""
    return bytes_text(value)


def destination(event: ConnectEvent) -> tuple[str, str, int]:
    """(protocol, address, port) of a connect: a unix socket's address is its path."""
    if event.family == "unix":
        return "unix", _text(event.path), 0
    return event.protocol, event.daddr, event.dport


def _label(protocol: str, address: str, port: int) -> str:
    if protocol == "unix":
        return f"unix:{address}"
    host = f"[{address}]" if ":" in address else address
    return f"{host}:{port}/{protocol}"


class RunSummary:
    """Counts of what one run did, fed by the pipeline like any sink."""

    def __init__(self, *, detecting: bool = True) -> None:
        self.detecting = detecting  # False: alerts are raised elsewhere (--server) or not at all
        self.alerts: Counter[tuple[str, str, str]] = Counter()  # (level, rule id, title)
        self.repeats: Counter[tuple[str, str, str]] = Counter()  # events folded into repeats
        self.executables: Counter[bytes] = Counter()
        self.connects: Counter[tuple[str, str, int]] = Counter()
        self.failed: Counter[tuple[str, str, int]] = Counter()
        self.lost = {"kernel": 0, "user": 0, "spool": 0, "map_errors": 0}
        # DNS answers over TCP whose message went on past its first segment: the addresses
        # after it were not learnt in the kernel (see collector.dns.SPLIT)
        self.dns_split = 0

    # -- Sink ---------------------------------------------------------------------------------

    def emit(self, event: AnyEvent | Alert) -> None:
        if isinstance(event, Alert):
            key = (event.level, event.rule_id, event.title)
            if event.repeat:
                self.repeats[key] += event.count - 1  # its count includes the first alert's
            else:
                self.alerts[key] += 1
        elif isinstance(event, ExecEvent):
            self.executables[event.process.exe] += 1
        elif isinstance(event, ConnectEvent):
            # a "repeated" event reports only connects the kernel counted and did not send
            n = event.repeats + (event.outcome != "repeated")
            where = destination(event)
            self.connects[where] += n
            if event.outcome == "error":
                self.failed[where] += n
        elif isinstance(event, DnsEvent):
            self.dns_split += event.error.startswith(SPLIT)
        elif isinstance(event, LostEvent):
            self.lost["kernel"] += sum(event.kernel.values())
            self.lost["user"] += event.user
            self.lost["spool"] += event.spool
            self.lost["map_errors"] += sum(event.errors.values())

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    # -- what it says -------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-able data (bytes as json_line() writes them)."""
        by_rule = sorted(
            self.alerts.keys() | self.repeats.keys(),
            key=lambda k: (LEVELS.index(k[0]) if k[0] in LEVELS else len(LEVELS), k[2], k[1]),
        )
        by_level = Counter[str]()
        for (level, _, _), n in self.alerts.items():
            by_level[level] += n
        return {
            "detection": self.detecting,
            "alerts": {
                "total": sum(self.alerts.values()),
                "by_level": {lv: by_level[lv] for lv in sorted(by_level, key=_level_order)},
                "by_rule": [
                    {
                        "rule_id": rid,
                        "title": title,
                        "level": level,
                        "alerts": self.alerts[(level, rid, title)],
                        "events": self.alerts[(level, rid, title)]
                        + self.repeats[(level, rid, title)],
                    }
                    for level, rid, title in by_rule
                ],
            },
            "executables": [{"path": _text(exe), "count": n} for exe, n in _most(self.executables)],
            "destinations": [
                {
                    "destination": _label(*where),
                    "protocol": where[0],
                    "address": where[1],
                    "port": where[2],
                    "connects": n,
                    "failed": self.failed[where],
                }
                for where, n in _most(self.connects)
            ],
            "lost": dict(self.lost),
            "dns_answers_split": self.dns_split,
        }

    def lines(self) -> list[str]:
        """The summary for a terminal, untrusted names escaped, long lists cut at SHOWN."""
        d = self.as_dict()
        alerts = d["alerts"]
        out = ["summary of the run:"]
        if not self.detecting:
            out.append("  alerts: none raised here (detection is off or done by the service)")
        else:
            levels = ", ".join(f"{lv} {n}" for lv, n in alerts["by_level"].items())
            out.append(f"  alerts: {alerts['total']}" + (f" ({levels})" if levels else ""))
            rows = [
                f"    {r['level']:<13} {r['alerts']:>4}  {escape(r['title'])}"
                + (f" ({r['events']} events)" if r["events"] != r["alerts"] else "")
                for r in alerts["by_rule"]
            ]
            out += _cut(rows)
        execs = d["executables"]
        runs = sum(e["count"] for e in execs)
        out.append(f"  executables: {len(execs)} distinct, {runs} execs")
        out += _cut([f"    {e['count']:>4}  {escape(text_bytes(e['path']))}" for e in execs])
        dests = d["destinations"]
        connects = sum(x["connects"] for x in dests)
        out.append(f"  destinations: {len(dests)} distinct, {connects} connects")
        out += _cut(
            [
                f"    {x['connects']:>4}  {escape(text_bytes(x['destination']))}"
                + (f" ({x['failed']} failed)" if x["failed"] else "")
                for x in dests
            ]
        )
        lost = d["lost"]
        said = ", ".join(f"{k} {n}" for k, n in lost.items() if n)
        out.append(f"  lost: {said or 'nothing'}")
        if self.dns_split:
            out.append(
                f"  dns: {self.dns_split} answers over TCP split across segments (the "
                "addresses past the first segment were not learnt)"
            )
        return out

    def report(self, stream: IO[str], json_path: str | None = None) -> None:
        """Say the summary on `stream` and, when asked, write it to `json_path` as JSON; a
        file that cannot be written is said, not raised (the run has happened)."""
        for line in self.lines():
            stream.write(f"sandtrace: {line}\n")
        if json_path is None:
            return
        try:
            Path(json_path).write_text(
                json.dumps(self.as_dict(), ensure_ascii=True, indent=2) + "\n", encoding="ascii"
            )
        except OSError as exc:
            stream.write(f"sandtrace: --summary {json_path}: cannot write: {exc}\n")


def _level_order(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else len(LEVELS)


def _most(counts: Counter[K]) -> list[tuple[K, int]]:
    """Most first, then by key, so the order is the same run after run."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))


def _cut(rows: list[str]) -> list[str]:
    if len(rows) <= SHOWN:
        return rows
    return [*rows[:SHOWN], f"    ... {len(rows) - SHOWN} more (all of them with --summary FILE)"]
