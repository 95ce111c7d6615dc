"""`sandtrace policy suggest FILE...`: an egress allow-list proposed from recorded events.

Read the JSON lines `run`/`watch` ``--events`` write, count the connects of each sandbox to
each destination, and propose the entries (in the ``--egress-allow`` syntax,
``[SANDBOX=]DEST[:PORTS]``, as the service's TOML, or as an ``--egress-policy`` file) that
would have let all of them pass: a start for moving from audit (trace, look) to enforcement
(the allow-list alerts on the rest). Loopback destinations and unix sockets are left out (an
allow-list lets loopback pass unless told otherwise, and unix sockets are not egress), and a
note says how many.

A destination is named by the name the sandbox resolved for its address when the event
carries one (a DNS answer the sandbox received; not a TLS server name, which a policy does
not trust), else by its address: a name survives the
address changes of a service behind a CDN, and reads better. `_destination` is the one place
that chooses. A policy file also names the DNS servers the sandbox asked (port 53 connects
and the servers of its DNS answers) as its resolvers, instead of allow entries for them.
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

from api.events import ConnectEvent, DnsEvent, EventFormatError
from api.wire import event_from_json
from detect.egress import DNS_PORT, parse_name, parse_resolver
from detect.policyfile import toml_key
from sandtrace.suffixes import PUBLIC_SUFFIX_LIST, PublicSuffixes


@dataclass(slots=True)
class _Destination:
    connects: int = 0
    ports: Counter[int] = field(default_factory=Counter)
    protocols: set[str] = field(default_factory=set)
    names: int = 1  # the names a wildcard stands for

    def merge(self, other: _Destination) -> None:
        self.connects += other.connects
        self.ports.update(other.ports)
        self.protocols |= other.protocols

    def what(self) -> str:
        """What an entry's comment says besides its count: its protocols (and names)."""
        protocols = ",".join(sorted(self.protocols)) or "?"
        return f"{protocols}; {self.names} names" if self.names > 1 else protocols


@dataclass(slots=True)
class Suggestion:
    """Connects counted per sandbox and destination, and what was left out."""

    # sandbox -> destination (name or address) -> its connects
    sandboxes: dict[str, dict[str, _Destination]] = field(default_factory=lambda: defaultdict(dict))
    # sandbox -> DNS server address -> queries sent to it (port 53 connects) and answers
    # received from it (dns events)
    resolvers: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
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
        if event.dport == DNS_PORT:
            self.resolvers[event.sandbox][_unmapped(event.daddr)] += count
        name = _destination(event)
        dest = self.sandboxes[event.sandbox].get(name)
        if dest is None:
            dest = self.sandboxes[event.sandbox][name] = _Destination()
        dest.connects += count
        if event.dport:
            dest.ports[event.dport] += count
        if event.protocol:
            dest.protocols.add(event.protocol)

    def add_answer(self, event: DnsEvent) -> None:
        if event.resolver:
            self.resolvers[event.sandbox][_unmapped(event.resolver)] += 1

    def resolvers_of(self, sandbox: str, *, any_sandbox: bool = False) -> list[str]:
        """The DNS servers a sandbox (every sandbox, with any_sandbox) asked, most used
        first."""
        counts: Counter[str] = Counter()
        for name, servers in self.resolvers.items():
            if any_sandbox or name == sandbox:
                counts.update(servers)
        return sorted(counts, key=lambda a: (-counts[a], a))

    def entries(
        self,
        *,
        any_sandbox: bool = False,
        dns_apart: bool = False,
        wildcards: int = 0,
        suffixes: PublicSuffixes | None = None,
    ) -> list[tuple[str, str, int, str]]:
        """(sandbox, entry, connects, what) per destination: busiest sandbox first, in
        each the most connected destination first (then by name). With `any_sandbox`, one
        list for every sandbox (entries without SANDBOX=). With `dns_apart`, entries for
        DNS servers on port 53 alone are left out (a policy names them as resolvers). With
        `wildcards` and `suffixes`, that many names or more below one registrable domain
        are one ``*.DOMAIN`` entry."""
        groups: dict[str, dict[str, _Destination]] = self.sandboxes
        if any_sandbox:
            merged: dict[str, _Destination] = {}
            for dests in self.sandboxes.values():
                for name, d in dests.items():
                    merged.setdefault(name, _Destination()).merge(d)
            groups = {"": merged} if merged else {}
        if wildcards and suffixes is not None:
            groups = {s: _wildcarded(d, wildcards, suffixes) for s, d in groups.items()}
        out = []
        for sandbox in sorted(
            groups, key=lambda s: (-sum(d.connects for d in groups[s].values()), s)
        ):
            dests = groups[sandbox]
            for name in sorted(dests, key=lambda n: (-dests[n].connects, n)):
                d = dests[name]
                ports = sorted(d.ports)
                asked = self.resolvers_of(sandbox, any_sandbox=any_sandbox) if dns_apart else []
                if DNS_PORT in ports and _unmapped(name) in asked:
                    ports.remove(DNS_PORT)  # the policy's resolvers allow it
                    if not ports:
                        continue
                entry = _entry(sandbox, name, ports)
                out.append((sandbox, entry, d.connects, d.what()))
        return out


def _wildcarded(
    dests: dict[str, _Destination], min_names: int, suffixes: PublicSuffixes
) -> dict[str, _Destination]:
    """dests with every `min_names` or more names strictly below one registrable domain
    made one ``*.DOMAIN`` destination (the domain's own name, if there, stays apart: a
    wildcard does not stand for it). Addresses and names below a public suffix alone are
    left as they are."""
    below: dict[str, list[str]] = defaultdict(list)
    for name in dests:
        if _is_address(name):
            continue
        domain = suffixes.registrable(name)
        if domain is not None and name != domain:
            below[domain].append(name)
    out = dict(dests)
    for domain, names in below.items():
        if len(names) >= min_names:
            wildcard = out[f"*.{domain}"] = _Destination(names=len(names))
            for name in names:
                wildcard.merge(out.pop(name))
    return out


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _destination(event: ConnectEvent) -> str:
    """What names a destination in the allow-list: the name the sandbox resolved for it
    (preferred) when an allow-list can hold it, else its address. A TLS server name does
    not count (a policy's names allow by DNS answers only), and DNS goes by address: a
    resolver is named by its address."""
    if event.hostname and event.hostname_source == "dns" and event.dport != DNS_PORT:
        try:
            return parse_name(event.hostname)
        except ValueError:
            pass  # a name the sandbox was answered with, not one a policy can hold
    return event.daddr


def _unmapped(addr: str) -> str:
    """An address as a policy keeps it: an IPv4-mapped IPv6 address as its IPv4 address."""
    try:
        return str(parse_resolver(addr))
    except ValueError:
        return addr


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
            elif isinstance(event, DnsEvent):
                suggestion.add_answer(event)


def render(
    suggestion: Suggestion,
    fmt: str,
    *,
    any_sandbox: bool,
    out: IO[str],
    wildcards: int = 0,
    suffixes: PublicSuffixes | None = None,
) -> None:
    """The allow-list as `fmt`: "text" (entries, each with its count, under a header per
    sandbox), "flags" (the options of run/watch), "toml" (the service's [detection]) or
    "policy" (an --egress-policy file, resolvers apart); names grouped in wildcards as
    Suggestion.entries does."""
    entries = suggestion.entries(
        any_sandbox=any_sandbox,
        dns_apart=fmt == "policy",
        wildcards=wildcards,
        suffixes=suffixes,
    )
    if fmt == "policy":
        _render_policy(suggestion, entries, any_sandbox=any_sandbox, out=out)
        return
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


def _render_policy(
    suggestion: Suggestion,
    entries: list[tuple[str, str, int, str]],
    *,
    any_sandbox: bool,
    out: IO[str],
) -> None:
    """An --egress-policy file of `entries`: a [default] table (any_sandbox) or a
    [sandbox.NAME] table per sandbox, each with its allow entries (counted) and the
    resolvers it asked."""
    out.write(f"# sandtrace policy suggest: {suggestion.events} events\n")
    tables = list(dict.fromkeys(sandbox for sandbox, _, _, _ in entries))
    for sandbox in suggestion.resolvers:  # a sandbox that only asked DNS
        if not any_sandbox and sandbox not in tables and suggestion.resolvers[sandbox]:
            tables.append(sandbox)
    if any_sandbox and not tables:
        tables = [""]
    for sandbox in tables:
        out.write("\n[default]\n" if any_sandbox else f"\n[sandbox.{toml_key(sandbox)}]\n")
        out.write("allow = [\n")
        for s, entry, n, protocols in entries:
            if s == sandbox:  # the table names the sandbox: the entry without SANDBOX=
                bare = entry.removeprefix(f"{s}=") if s else entry
                out.write(f"    {json.dumps(bare)},  # {n} connects ({protocols or '?'})\n")
        out.write("]\n")
        servers = suggestion.resolvers_of(sandbox, any_sandbox=any_sandbox)
        if servers:
            out.write(f"resolvers = [{', '.join(json.dumps(a) for a in servers)}]\n")


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
    if not suggestion.sandboxes and not (args.format == "policy" and suggestion.resolvers):
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
    suffixes = None
    if args.wildcards:
        suffixes = PublicSuffixes.read()
        if suffixes is None:
            print(
                f"sandtrace: note: --wildcards needs the Public Suffix List ({PUBLIC_SUFFIX_LIST}"
                ", Debian's publicsuffix package): names are proposed one by one",
                file=sys.stderr,
            )
    render(
        suggestion,
        args.format,
        any_sandbox=args.any_sandbox,
        out=sys.stdout,
        wildcards=args.wildcards,
        suffixes=suffixes,
    )
    return 0
