"""Egress allow-lists: the destinations each sandbox may connect to.

The engine checks every connect against its sandbox's list and raises EGRESS_RULE for one
outside it. Loopback destinations (127.0.0.0/8, ::1, and 127.x as an IPv4-mapped IPv6
address) are the sandbox talking to its own host and pass without an entry, unless the
policy is built with ``allow_loopback=False``: then they are judged by the list like any
other destination (a sandbox in the host's network namespace reaches every service the host
listens with on loopback, which is worth an alert on some hosts). An IPv4-mapped IPv6
destination (::ffff:a.b.c.d, what an IPv6 socket connecting to IPv4 shows) is judged as the
IPv4 address it is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from detect.addresses import ip_int

EGRESS_RULE_ID = "sandtrace-egress-allow-list"


@dataclass(frozen=True, slots=True)
class BuiltinRule:
    """A check of sandtrace's own that alerts as a rule does (see engine.RuleInfo)."""

    id: str
    title: str
    level: str
    tags: list[str]


EGRESS_RULE = BuiltinRule(
    EGRESS_RULE_ID,
    "Connection outside the sandbox's egress allow-list",
    "high",
    ["attack.exfiltration", "attack.command_and_control", "attack.t1041"],
)
_EGRESS_ANSWERS = 4096  # (address, port) answers an egress policy keeps
_PORTS_EXPECTED = "expected ports 1-65535: one (443), a range (8000-8100) or a list (80,443)"
_PORT_ITEM = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRanges = tuple[tuple[int, int], ...]
"""Inclusive (first, last) port ranges; empty means every port."""


def parse_ports(text: str) -> PortRanges:
    """``443``, ``8000-8100``, ``80,443,8000-8100`` as ranges. ValueError says what is wrong
    and what is expected: every port lies in 1-65535 and a range runs upwards."""
    ranges = []
    for item in text.split(","):
        m = _PORT_ITEM.fullmatch(item)
        if m is None:
            raise ValueError(f"{item!r} is not a port or a range ({_PORTS_EXPECTED})")
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        for port in (first, last):
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is out of range ({_PORTS_EXPECTED})")
        if last < first:
            raise ValueError(f"range {item} runs backwards ({_PORTS_EXPECTED})")
        ranges.append((first, last))
    return tuple(sorted(ranges))


def parse_entry(text: str) -> tuple[Network, PortRanges]:
    """One entry, ``NETWORK[:PORTS]`` or ``[IPV6-NETWORK][:PORTS]``, as (network, ports).
    ValueError says what is wrong and what is expected."""
    if text.startswith("["):
        net_part, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPV6-NETWORK] or [IPV6-NETWORK]:PORTS")
        ports_part: str | None = rest[1:] if rest else None
    elif text.count(":") == 1:
        net_part, _, ports_part = text.partition(":")
    else:
        net_part, ports_part = text, None
    try:
        net = ipaddress.ip_network(net_part, strict=False)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (expected an address or a network such as 192.0.2.0/24, optionally "
            "followed by :PORTS)"
        ) from None
    return net, parse_ports(ports_part) if ports_part is not None else ()


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NAME_EXPECTED = (
    "expected a DNS name such as pypi.org or a wildcard such as *.githubusercontent.com, "
    "optionally followed by :PORTS"
)


def parse_name(text: str) -> str:
    """A DNS name or wildcard as a policy keeps it: lower case, no trailing dot; ``*.`` only
    as the first label (``*.example.org`` stands for every name strictly below
    example.org, not example.org itself). ValueError says what is wrong and what is
    expected."""
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
    if not labels or len(name) > 253:
        raise ValueError(f"{text!r} is not a DNS name ({_NAME_EXPECTED})")
    for label in labels:
        if not _LABEL.fullmatch(label):
            what = "'*' is allowed only as the first label" if "*" in label else "bad label"
            raise ValueError(f"{text!r}: {what} {label!r} ({_NAME_EXPECTED})")
    return name


def name_matches(pattern: str, hostname: str) -> bool:
    """Whether hostname (lower case, no trailing dot) is the name pattern stands for:
    itself, or for ``*.domain`` any name strictly below domain."""
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return hostname == pattern


def parse_destination(text: str) -> tuple[Network | str, PortRanges]:
    """An allow-list entry: a network as parse_entry takes it, or a name or wildcard as
    parse_name takes it (``pypi.org``, ``*.githubusercontent.com:443``), with its ports.
    A name comes back as a str."""
    if text.startswith("[") or text.count(":") > 1:
        return parse_entry(text)
    host, sep, ports = text.partition(":")
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError:
        if any(c.isalpha() or c == "*" for c in host) and "/" not in host:
            return parse_name(host), parse_ports(ports) if sep else ()
    return parse_entry(text)


def _entry(spec: str, text: str) -> tuple[Network | str, PortRanges]:
    """parse_destination(text), its error naming the whole entry as given (spec)."""
    try:
        return parse_destination(text)
    except ValueError as exc:
        raise ValueError(f"egress allow-list entry {spec!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Destinations a sandbox may connect to: networks, each with optional ports; names and
    wildcards (``names``, as parse_name keeps them), each with optional ports, matched
    against the name the sandbox resolved for an address; loopback too unless
    allow_loopback is False (see the module docstring). ``resolvers`` are the only DNS
    servers the sandbox may query (empty: the nameservers of its resolv.conf)."""

    allowed: tuple[tuple[Network, PortRanges], ...] = ()
    allow_loopback: bool = True
    names: tuple[tuple[str, PortRanges], ...] = ()
    resolvers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    # `allowed` as (version, netmask, network, ports) integers
    _ints: list[tuple[int, int, int, PortRanges]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    _answers: dict[tuple[str, int], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._ints.extend(
            (net.version, int(net.netmask), int(net.network_address), ports)
            for net, ports in self.allowed
        )

    @classmethod
    def parse(cls, specs: Iterable[str], allow_loopback: bool = True) -> EgressPolicy:
        """Entries like ``192.0.2.0/24``, ``198.51.100.7:443``, ``10.0.0.0/8:80,443``,
        ``10.0.0.0/8:8000-8100``, ``2001:db8::/32``, with ports ``[2001:db8::/32]:53``,
        and names: ``pypi.org``, ``*.githubusercontent.com:443``. ValueError names a bad
        one and says what is expected."""
        return cls.of([_entry(spec, spec) for spec in specs], allow_loopback)

    @classmethod
    def of(
        cls, entries: Iterable[tuple[Network | str, PortRanges]], allow_loopback: bool = True
    ) -> EgressPolicy:
        """A policy of parsed entries, networks and names (str) mixed."""
        entries = list(entries)
        return cls(
            tuple((d, p) for d, p in entries if not isinstance(d, str)),
            allow_loopback,
            tuple((d, p) for d, p in entries if isinstance(d, str)),
        )

    def allows(self, addr: str, port: int) -> bool:
        # Sandboxes connect to the same few destinations again and again: answers are kept
        # (a bounded number, forgotten all at once when full; the list never changes).
        key = (addr, port)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _EGRESS_ANSWERS:
                self._answers.clear()
            answer = self._answers[key] = self._allows(addr, port)
        return answer

    def _allows(self, addr: str, port: int) -> bool:
        parsed = ip_int(addr)
        if parsed is None:
            return False
        # Integer compares, in the order of the list: ipaddress's `in` and is_loopback cost
        # more than all the rest of the check.
        version, value = parsed
        if version == 6 and value >> 32 == 0xFFFF:
            version, value = 4, value & 0xFFFFFFFF  # IPv4-mapped: judged as the IPv4 address
        if self.allow_loopback and (value >> 24 == 127 if version == 4 else value == 1):
            return True  # the sandbox talking to its own host (127.0.0.0/8, ::1)
        for net_version, mask, network, ports in self._ints:
            if net_version == version and value & mask == network:
                if not ports:
                    return True
                for first, last in ports:
                    if first <= port <= last:
                        return True
        return False


@dataclass(slots=True)
class EgressPolicies:
    """Egress allow-lists per sandbox, and one for every sandbox not named."""

    default: EgressPolicy | None = None
    per_sandbox: dict[str, EgressPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str], allow_loopback: bool = True) -> EgressPolicies:
        """Entries as EgressPolicy.parse takes them, each optionally prefixed ``SANDBOX=``
        (a sandbox id) to apply to that sandbox only; a sandbox named in any entry gets
        only its own entries. allow_loopback applies to every list."""
        shared: list[tuple[Network | str, PortRanges]] = []
        named: dict[str, list[tuple[Network | str, PortRanges]]] = {}
        for spec in specs:
            sandbox, sep, rest = spec.partition("=")
            if sep and not sandbox:
                raise ValueError(
                    f"egress allow-list entry {spec!r}: no sandbox before '=' (expected "
                    "SANDBOX=NETWORK[:PORTS] or NETWORK[:PORTS])"
                )
            if sep:
                named.setdefault(sandbox, []).append(_entry(spec, rest))
            else:
                shared.append(_entry(spec, spec))
        return cls(
            default=EgressPolicy.of(shared, allow_loopback) if shared else None,
            per_sandbox={
                name: EgressPolicy.of(entries, allow_loopback) for name, entries in named.items()
            },
        )

    def policy_for(self, sandbox: str) -> EgressPolicy | None:
        return self.per_sandbox.get(sandbox, self.default)

    def __len__(self) -> int:
        policies = [*self.per_sandbox.values(), *([self.default] if self.default else [])]
        return sum(len(p.allowed) + len(p.names) for p in policies)
