"""`sandtrace replay`: recorded events through the detection engine, as if live.

The input is what `sandtrace run|watch --events FILE` writes: one json_line() per event, with
the alerts raised at the time among them (skipped here: the engine raises its own). Each
event goes to the engine in file order; fold windows and correlation windows close by the
events' own clock (every EXPIRE_STEP_NS of event time, as the live pipeline closes them every
pass of its loop by the wall clock) and all at the end, so repeat summaries come out as they
did live. A line that is not an event is counted and named by its number, never fatal.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from api.events import Alert, AnyEvent, EventFormatError
from api.render import TerminalSink, TextRenderer, use_color
from api.wire import event_from_json
from collector.pipeline import JsonFileSink, Sink
from detect.egress import EgressPolicies
from detect.engine import Engine
from detect.pack import RulesPathError, load_rules, refusal_lines

EXPIRE_STEP_NS = 100_000_000  # the live pipeline's loop runs at least every 0.1 s
SHOWN_MALFORMED = 10  # lines reported one by one; the rest are counted and listed by number


class UsageError(Exception):
    """Arguments or files that cannot be used (exit 2)."""


@dataclass(slots=True)
class Malformed:
    source: str
    line: int
    why: str


@dataclass(slots=True)
class ReplayStats:
    events: int = 0
    alert_lines: int = 0  # alerts recorded in the input, skipped
    alerts: int = 0  # alerts raised by this replay
    malformed: list[Malformed] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # files that failed mid-way


def read_events(
    lines: Iterable[bytes], source: str, stats: ReplayStats, err: IO[str]
) -> Iterator[AnyEvent]:
    """The events of one input, in order; alert lines counted and skipped, anything else
    that is not an event counted in stats.malformed (the first few said on `err`)."""
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text:
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            why = f"not JSON: {exc}"
        else:
            if isinstance(obj, dict) and obj.get("kind") == "alert":
                stats.alert_lines += 1
                continue
            try:
                event = event_from_json(obj)
            except (EventFormatError, ValueError, TypeError, RecursionError) as exc:
                why = f"not an event: {exc}"
            else:
                stats.events += 1
                yield event
                continue
        stats.malformed.append(Malformed(source, number, why))
        if len(stats.malformed) <= SHOWN_MALFORMED:
            err.write(f"sandtrace: {source}:{number}: skipped, {why}\n")


def replay(events: Iterable[AnyEvent], engine: Engine, sinks: list[Sink]) -> int:
    """Feed every event to the engine and every alert to the sinks; the number of alerts."""
    alerts = 0

    def out(raised: list[Alert]) -> None:
        nonlocal alerts
        for alert in raised:
            alerts += 1
            for sink in sinks:
                sink.emit(alert)

    next_expire: int | None = None
    for event in events:
        out(engine.feed(event))
        now = event.time_ns
        if next_expire is None:
            next_expire = now + EXPIRE_STEP_NS
        elif now >= next_expire:
            out(engine.expire(now))
            next_expire = now + EXPIRE_STEP_NS
    out(engine.flush())
    for sink in sinks:
        sink.flush()
    return alerts


def _engine(args: argparse.Namespace, err: IO[str]) -> Engine:
    """The built-in pack and the user's rules, as `run` loads them; refusals said."""
    try:
        rules = load_rules(args.rules, builtin=not args.no_builtin_rules)
    except RulesPathError as exc:
        raise UsageError(str(exc)) from None
    for line in refusal_lines(rules):
        err.write(f"sandtrace: {line}\n")
    try:
        egress = EgressPolicies.parse(args.egress_allow) if args.egress_allow else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return Engine(rules, egress)


def _sinks(args: argparse.Namespace, out: IO[str]) -> list[Sink]:
    if args.width < 1:
        raise UsageError(f"--width must be at least 1, not {args.width}")
    renderer = None if args.json else TextRenderer(use_color(args.color, out), args.width)
    sinks: list[Sink] = [TerminalSink(out, renderer, alerts_only=True)]
    if args.alerts:
        try:
            sinks.append(JsonFileSink(args.alerts, alerts_only=True))
        except OSError as exc:
            raise UsageError(f"--alerts {args.alerts}: {exc}") from None
    return sinks


def _inputs(files: list[str]) -> list[str]:
    if files.count("-") > 1:
        raise UsageError("stdin (-) can be read only once")
    for f in files:
        if f != "-" and not Path(f).is_file():
            raise UsageError(f"events file {f} does not exist or is not a file")
    return files


def _lines(name: str, stats: ReplayStats, err: IO[str]) -> Iterator[bytes]:
    """The lines of one input; a read error ends it, said and counted."""
    try:
        if name == "-":
            yield from sys.stdin.buffer
        else:
            with Path(name).open("rb") as f:
                yield from f
    except OSError as exc:
        stats.unreadable.append(name)
        err.write(f"sandtrace: {name}: read failed: {exc}\n")


def _said(stats: ReplayStats) -> str:
    numbers = [f"{m.source}:{m.line}" for m in stats.malformed[:20]]
    more = len(stats.malformed) - len(numbers)
    where = ", ".join(numbers) + (f" and {more} more" if more > 0 else "")
    malformed = f"{len(stats.malformed)} malformed lines skipped" + (
        f" ({where})" if stats.malformed else ""
    )
    return (
        f"replayed {stats.events} events: {stats.alerts} alerts; "
        f"{stats.alert_lines} recorded alert lines skipped; {malformed}"
    )


def run(args: argparse.Namespace, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    files = _inputs(args.files)
    engine = _engine(args, err)
    sinks = _sinks(args, out)
    stats = ReplayStats()

    def events() -> Iterator[AnyEvent]:
        for name in files:
            yield from read_events(
                _lines(name, stats, err), "stdin" if name == "-" else name, stats, err
            )

    try:
        stats.alerts = replay(events(), engine, sinks)
    finally:
        for sink in sinks:
            sink.close()
    err.write(f"sandtrace: {_said(stats)}\n")
    return 1 if stats.malformed or stats.unreadable else 0


def main(args: argparse.Namespace) -> int:
    """Run `sandtrace replay` with parsed arguments."""
    try:
        return run(args)
    except UsageError as exc:
        print(f"sandtrace: {exc}", file=sys.stderr)
        return 2
