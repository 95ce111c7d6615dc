"""`sandtrace policy suggest FILE...`: an egress allow-list proposed from recorded events.

Read the JSON lines `run`/`watch` ``--events`` write, count the connects of each sandbox to
each destination, and propose the entries (in the ``--egress-allow`` syntax,
``[SANDBOX=]NET[:PORTS]``, or as the service's TOML) that would have let all of them pass:
a start for moving from audit (trace, look) to enforcement (the allow-list alerts on the
rest). Loopback destinations and unix sockets are left out (an allow-list lets loopback
pass unless told otherwise, and unix sockets are not egress), and a note says how many.

A destination is named by its host name when the event carries one (the name the process
looked up), else by its address: a name survives the address changes of a service behind a
CDN, and reads better. Events of this version carry addresses only; `_destination` is the
one place that chooses.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from api.events import ConnectEvent, EventFormatError
from api.wire import event_from_json


@dataclass(slots=True)
class _Destination:
    connects: int = 0
    ports: Counter[int] = field(default_factory=Counter)
    protocols: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Suggestion:
    """Connects counted per sandbox and destination, and what was left out."""

    # sandbox -> destination (name or address) -> its connects
    sandboxes: dict[str, dict[str, _Destination]] = field(default_factory=lambda: defaultdict(dict))
    loopback: int = 0  # connects to loopback, left out
    unix: int = 0  # unix socket connects, left out
    events: int = 0  # events read
    unreadable: list[str] = field(default_factory=list)  # "FILE:LINE: why"

    def add(self, event: ConnectEvent) -> None:
        count = event.repeats + (0 if event.outcome == "repeated" else 1)
        if event.family == "unix":
            self.unix += count
            return
        if _loopback(event.daddr):
            self.loopback += count
            return
        name = _destination(event)
        dest = self.sandboxes[event.sandbox].get(name)
        if dest is None:
            dest = self.sandboxes[event.sandbox][name] = _Destination()
        dest.connects += count
        if event.dport:
            dest.ports[event.dport] += count
        if event.protocol:
            dest.protocols.add(event.protocol)

    def entries(self, *, any_sandbox: bool = False) -> list[tuple[str, str, int, str]]:
        """(sandbox, entry, connects, protocols) per destination: busiest sandbox first,
        in each the most connected destination first (then by name). With `any_sandbox`,
        one list for every sandbox (entries without SANDBOX=)."""
        groups: dict[str, dict[str, _Destination]] = self.sandboxes
        if any_sandbox:
            merged: dict[str, _Destination] = {}
            for dests in self.sandboxes.values():
                for name, d in dests.items():
                    m = merged.setdefault(name, _Destination())
                    m.connects += d.connects
                    m.ports.update(d.ports)
                    m.protocols |= d.protocols
            groups = {"": merged} if merged else {}
        out = []
        for sandbox in sorted(
            groups, key=lambda s: (-sum(d.connects for d in groups[s].values()), s)
        ):
            dests = groups[sandbox]
            for name in sorted(dests, key=lambda n: (-dests[n].connects, n)):
                d = dests[name]
                entry = _entry(sandbox, name, sorted(d.ports))
                out.append((sandbox, entry, d.connects, ",".join(sorted(d.protocols))))
        return out


def _destination(event: ConnectEvent) -> str:
    """What names a destination in the allow-list: its host name when the event carries
    one (preferred), else its address."""
    name = getattr(event, "hostname", "") or getattr(event, "daddr_name", "")
    return name if isinstance(name, str) and name else event.daddr


def _loopback(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _entry(sandbox: str, name: str, ports: list[int]) -> str:
    """``[SANDBOX=]NET[:PORTS]``: an IPv6 address in brackets (its colons would read as a
    port otherwise), ports as a list."""
    net = f"[{name}]" if ":" in name else name
    where = f"{sandbox}=" if sandbox else ""
    return f"{where}{net}" + (f":{','.join(map(str, ports))}" if ports else "")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    if path == "-":
        yield from enumerate(sys.stdin, 1)
        return
    with open(path, encoding="utf-8") as f:  # noqa: PTH123 - a path from the command line
        yield from enumerate(f, 1)


def read_events(paths: Iterable[str], suggestion: Suggestion) -> None:
    """Count the connects of every file; OSError for a file that cannot be read."""
    for path in paths:
        for number, line in _lines(path):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError as exc:
                suggestion.unreadable.append(f"{path}:{number}: not JSON ({exc})")
                continue
            if isinstance(d, dict) and d.get("kind") == "alert":
                continue  # an alert file's lines, or alerts in a --json output: not events
            try:
                event = event_from_json(d)
            except EventFormatError as exc:
                suggestion.unreadable.append(f"{path}:{number}: {exc}")
                continue
            suggestion.events += 1
            if isinstance(event, ConnectEvent):
                suggestion.add(event)


def render(suggestion: Suggestion, fmt: str, *, any_sandbox: bool, out: IO[str]) -> None:
    """The allow-list as `fmt`: "text" (entries, each with its count, under a header per
    sandbox), "flags" (the options of run/watch) or "toml" (the service's [detection])."""
    entries = suggestion.entries(any_sandbox=any_sandbox)
    if fmt == "flags":
        out.write(" ".join(f"--egress-allow {entry}" for _, entry, _, _ in entries) + "\n")
        return
    if fmt == "toml":
        out.write("[detection]\negress_allow = [\n")
        for _, entry, n, protocols in entries:
            out.write(f"    {json.dumps(entry)},  # {n} connects ({protocols or '?'})\n")
        out.write("]\n")
        return
    current = None
    for sandbox, entry, n, protocols in entries:
        if sandbox != current:
            current = sandbox
            total = sum(c for s, _, c, _ in entries if s == sandbox)
            out.write(f"# sandbox {sandbox or '(any)'}: {total} connects\n")
        out.write(f"{entry}  # {n} connects ({protocols or '?'})\n")


def main(args: argparse.Namespace) -> int:
    """`sandtrace policy suggest`: 0 with a suggestion, 1 when the files hold no connect to
    propose, 2 when a file cannot be read."""
    suggestion = Suggestion()
    try:
        read_events(args.files, suggestion)
    except OSError as exc:
        print(
            f"sandtrace: policy suggest: cannot read {exc.filename}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    except UnicodeDecodeError as exc:
        print(f"sandtrace: policy suggest: not a text file of JSON lines: {exc}", file=sys.stderr)
        return 2
    for problem in suggestion.unreadable[:10]:
        print(f"sandtrace: policy suggest: line skipped: {problem}", file=sys.stderr)
    if len(suggestion.unreadable) > 10:
        print(
            f"sandtrace: policy suggest: {len(suggestion.unreadable) - 10} more lines skipped",
            file=sys.stderr,
        )
    left = []
    if suggestion.loopback:
        left.append(
            f"{suggestion.loopback} loopback connects (allowed unless --egress-check-loopback)"
        )
    if suggestion.unix:
        left.append(f"{suggestion.unix} unix socket connects (not egress)")
    if left:
        print(f"sandtrace: note: left out {' and '.join(left)}", file=sys.stderr)
    if not suggestion.sandboxes:
        print(
            f"sandtrace: policy suggest: no connect to propose in {suggestion.events} events",
            file=sys.stderr,
        )
        return 1
    if not args.any_sandbox and all(s.startswith("st-") for s in suggestion.sandboxes):
        print(
            "sandtrace: note: st-... sandboxes are `run`'s, new on every run: --any-sandbox "
            "proposes entries for any sandbox",
            file=sys.stderr,
        )
    render(suggestion, args.format, any_sandbox=args.any_sandbox, out=sys.stdout)
    return 0
