"""Detection-service soak: an hour and a half of a fleet's events through the service's own
ingest path, compressed into a minute; does the service's memory stay flat?

The path is the one `sandtrace serve` runs: each batch encoded as a collector sends it,
decoded (api/wire.py), handled by service.app.Ingest (an engine per host, built as serve
builds it, rules and egress allow-list included) and, once a simulated second, Ingest.expire
(serve's timer). Only the clock is simulated: the service's wall clock advances one second
per simulated second, and each host's events carry its own clock, skewed against the
service's by minutes to hours.

Every host starts new processes all the time: each simulated second it plays a few of the
rule pack's test cases (rules/tests, benign and hostile, correlations among them) as new
processes with pids and keys never seen before, and one long-lived process per host
connects each second to a destination off the allow-list (its repeats fold; a summary comes
out each minute). A fifth of the hosts go quiet after ten minutes.

Reported: the process's resident memory and what the engines hold (engines, open folds,
correlation windows and their entries) after the first simulated minute, the 60th and the
last; nothing is asserted. The pack's longest correlation window is an hour (an ssh client
followed by connects to loopback), so what is held grows for the first hour, and must not
after it; the quiet hosts' engines are dropped once their last window has ended. Also
runnable alone, without root: `python -m bench.soak [--hosts N] [--minutes M]`.
"""

from __future__ import annotations

import argparse
import gc
import heapq
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec.structs

from api.events import AncestorRef, AnyEvent, ConnectEvent, Event, LostEvent
from api.wire import decode_batch, encode_batch
from bench import Row, print_table
from detect.correlation import Distinct
from detect.egress import EgressPolicy
from detect.engine import Engine, Matcher
from detect.loader import load_paths
from detect.testing import Case, load_cases
from service.app import Ingest

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "rules"
NS = 1_000_000_000
T0 = 1_800_000_000 * NS
ALLOW = ["198.51.100.0/24", "10.0.0.0/8", "127.0.0.0/8"]  # the egress repeater is outside


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def rss_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith("VmRSS:")).split()[1])


@dataclass(slots=True)
class Held:
    """What the service holds at one moment."""

    minute: int
    rss_kib: int
    engines: int
    folds: int
    windows: int
    entries: int  # window entries (each holds its event) and value_count values

    @staticmethod
    def of(ingest: Ingest, minute: int) -> Held:
        gc.collect()
        folds = windows = entries = 0
        for engine in ingest.engines.values():
            folds += len(engine._folds)
            for by_group in engine._windows.values():
                windows += len(by_group)
                for w in by_group.values():
                    entries += len(w.seen) if isinstance(w, Distinct) else len(w.entries)
        return Held(minute, rss_kib(), len(ingest.engines), folds, windows, entries)


class Fleet:
    """The hosts' events, one simulated second at a time."""

    def __init__(self, hosts: int, per_second: int) -> None:
        cases = [c for f in sorted((RULES / "tests").glob("*.yml")) for c in load_cases(f)]
        self.cases: list[Case] = [c for c in cases if c.events]
        self.hosts = [f"soak-{i:03d}" for i in range(hosts)]
        # each host's clock against the service's: minutes either way, one three hours ahead
        self.skew = {h: (i - hosts // 2) * 97 * NS for i, h in enumerate(self.hosts)}
        self.skew[self.hosts[-1]] = 3 * 3600 * NS
        self.per_second = per_second
        self.pending: dict[str, list[tuple[int, int, AnyEvent]]] = {}  # per host, a heap
        self.order = itertools.count()
        self.played = 0
        self.next_pid = 100_000
        template = self.cases[0].events[0]
        if not isinstance(template, Event):
            raise TypeError(f"the first case's first event has no process: {template!r}")
        self.process = template.process

    def second(self, t: int) -> Iterator[tuple[str, list[AnyEvent]]]:
        """Each host's events of simulated second `t`, in time order (a case's later events,
        some a minute or an hour on, in the seconds they belong to)."""
        for i, host in enumerate(self.hosts):
            base = T0 + self.skew[host] + t * NS
            pending = self.pending.setdefault(host, [])
            if not (i % 5 == 4 and t >= 600):  # a fifth of the fleet goes quiet after 10 min
                for k in range(self.per_second):
                    case = self.cases[self.played % len(self.cases)]
                    self.played += 1
                    for event in self.play(case, host, base + k * NS // self.per_second):
                        heapq.heappush(pending, (event.time_ns, next(self.order), event))
                event = self.repeater(host, i, base + NS // 2, t)
                heapq.heappush(pending, (event.time_ns, next(self.order), event))
            events: list[AnyEvent] = []
            while pending and pending[0][0] < base + NS:
                events.append(heapq.heappop(pending)[2])
            if events:
                yield host, events

    def play(self, case: Case, host: str, at: int) -> list[AnyEvent]:
        """The case's events as processes never seen before on `host`, starting at `at`."""
        shift = self.next_pid
        self.next_pid += 1000
        out: list[AnyEvent] = []
        t0 = min(_time(e) for e in case.events)
        for event in case.events:
            if not isinstance(event, Event) or isinstance(event, LostEvent):
                continue
            p = event.process
            process = msgspec.structs.replace(
                p,
                pid=p.pid + shift,
                tid=p.tid + shift,
                ppid=p.ppid + shift,
                key=f"{p.pid + shift}@{shift}",
                ancestry=[
                    AncestorRef(pid=a.pid + shift, key=f"{a.pid + shift}@1", exe=a.exe, argv=a.argv)
                    for a in p.ancestry
                ],
            )
            when = at + (event.time_ns - t0)
            out.append(msgspec.structs.replace(event, host=host, time_ns=when, process=process))
        return out

    def repeater(self, host: str, index: int, at: int, t: int) -> AnyEvent:
        """The host's long-lived process, connecting off the allow-list once a second."""
        process = msgspec.structs.replace(
            self.process, pid=10 + index, tid=10 + index, key=f"{10 + index}@7"
        )
        return ConnectEvent(
            time_ns=at,
            mono_ns=0,
            host=host,
            sandbox="st-soak",
            cgroup_id=1,
            cgroup_path="/sandtrace/st-soak",
            container_id="",
            process=process,
            protocol="tcp",
            family="ipv4",
            daddr=f"203.0.113.{t % 50}",
            dport=443,
            saddr="192.0.2.2",
            sport=40000 + t % 20000,
            outcome="success",
        )


def _time(event: AnyEvent) -> int:
    return event.time_ns


def soak(hosts: int = 40, minutes: int = 90, per_second: int = 3) -> list[Row]:
    pack = load_paths([RULES])
    egress = EgressPolicy.parse(ALLOW)
    matchers: dict[type, Matcher] = {}  # as serve shares them among its engines
    alerts = summaries = events_in = 0

    def on_alert(alert: object) -> None:
        nonlocal alerts, summaries
        alerts += 1
        summaries += bool(getattr(alert, "repeat", False))

    now = 0.0
    ingest = Ingest(
        pack,
        on_alert=on_alert,
        engine_factory=lambda r: Engine(r, egress, 60.0, matchers),
        clock=lambda: now,
    )
    fleet = Fleet(hosts, per_second)
    seq: dict[str, int] = {}
    held: list[Held] = []
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    gc.collect()
    gc.freeze()  # as serve does: the rules and matchers are out of the collector's scans
    gc.set_threshold(50_000, 20, 20)
    started = time.monotonic()
    try:
        for t in range(minutes * 60):
            now = float(t)
            for host, events in fleet.second(t):
                n = seq.get(host, 0)
                seq[host] = n + 1
                collector, number, decoded = decode_batch(encode_batch(host, n, events))
                ingest.handle(collector, number, decoded)
                ingest.commit(ingest.ticket)
                events_in += len(events)
            now = t + 1.0
            ingest.expire()
            if (t + 1) % 60 == 0:
                minute = (t + 1) // 60
                if minute in (1, min(60, minutes), minutes):
                    held.append(Held.of(ingest, minute))
                    progress(f"soak: minute {minute}: {held[-1]}")
                elif minute % 10 == 0:
                    progress(f"soak: minute {minute} of {minutes}")
    finally:
        gc.set_threshold(*threshold)
        if not frozen:
            gc.unfreeze()
    took = time.monotonic() - started
    first, hour, last = held[0], held[len(held) // 2], held[-1]
    state = "{0.engines} / {0.folds} / {0.windows} / {0.entries}"
    return [
        (
            f"soak: {minutes} min of {hosts} hosts, RSS (MB)",
            f"{first.rss_kib / 1024:.0f}",
            f"{last.rss_kib / 1024:.0f}",
            f"min 1 vs {last.minute}; min {hour.minute}: {hour.rss_kib / 1024:.0f}",
        ),
        (
            "soak: engines / folds / windows / entries",
            state.format(first),
            state.format(last),
            f"min {hour.minute}: {state.format(hour)}",
        ),
        (
            "soak: events in, alerts (summaries)",
            "",
            f"{events_in:,}",
            f"{alerts:,} ({summaries:,}); run {took:.0f} s",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--hosts", type=int, default=40)
    parser.add_argument("--minutes", type=int, default=90)
    parser.add_argument("--per-second", type=int, default=3, help="cases per host-second")
    args = parser.parse_args(argv)
    print_table(soak(args.hosts, args.minutes, args.per_second))
    return 0


if __name__ == "__main__":
    sys.exit(main())
