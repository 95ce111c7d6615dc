"""Egress allow-lists: the destinations each sandbox may connect to, and the DNS servers
it may query.

The engine checks every connect (and unconnected UDP send) against its sandbox's list and
raises EGRESS_RULE for one outside it: a destination passes when its address lies in a
network entry, or when the name the sandbox resolved for it (the event's ``hostname``)
matches a name entry, with that entry's ports. Without a hostname only the networks can let
a destination pass. DNS (port 53, and the sandbox's ``dns`` answers) is judged by the
resolvers instead: a server that is not one of them raises RESOLVER_RULE.

Loopback destinations (127.0.0.0/8, ::1, and 127.x as an IPv4-mapped IPv6 address) are the
sandbox talking to its own host and pass without an entry, unless the policy is built with
``allow_loopback=False``: then they are judged by the list like any other destination (a
sandbox in the host's network namespace reaches every service the host listens with on
loopback, which is worth an alert on some hosts). An IPv4-mapped IPv6 destination
(::ffff:a.b.c.d, what an IPv6 socket connecting to IPv4 shows) is judged as the
IPv4 address it is.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from detect.addresses import ip_int

_T = TypeVar("_T")

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
RESOLVER_RULE_ID = "sandtrace-egress-resolver"
RESOLVER_RULE = BuiltinRule(
    RESOLVER_RULE_ID,
    "DNS to a server that is not one of the sandbox's resolvers",
    "high",
    ["attack.exfiltration", "attack.command_and_control", "attack.t1071.004"],
)
DNS_PORT = 53
_EGRESS_ANSWERS = 4096  # (address, port, hostname) answers an egress policy keeps
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


Resolver = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_resolver(text: str) -> Resolver:
    """A DNS server's address (``192.0.2.53``, ``2001:db8::53``), IPv4-mapped IPv6 taken as
    the IPv4 address it is. ValueError says what is wrong and what is expected."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (expected a DNS server's address such as "
            "192.0.2.53 or 2001:db8::53, without a port: DNS is port 53)"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


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
    _answers: dict[tuple[str, int, str], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # `resolvers` as (version, address) integers
    _resolver_ints: set[tuple[int, int]] = field(
        default_factory=set, init=False, repr=False, compare=False
    )
    # `names` by name: the exact ones, and the wildcards by the domain they stand below
    _exact: dict[str, list[PortRanges]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _below: dict[str, list[PortRanges]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._ints.extend(
            (net.version, int(net.netmask), int(net.network_address), ports)
            for net, ports in self.allowed
        )
        self._resolver_ints.update((r.version, int(r)) for r in self.resolvers)
        for pattern, ports in self.names:
            if pattern.startswith("*."):
                self._below.setdefault(pattern[2:], []).append(ports)
            else:
                self._exact.setdefault(pattern, []).append(ports)

    def with_resolvers(self, resolvers: Iterable[Resolver]) -> EgressPolicy:
        """This policy with `resolvers` as its DNS servers (a new policy: one in use is
        never changed, so an engine judging with it sees it whole)."""
        return replace(self, resolvers=tuple(resolvers))

    def is_resolver(self, addr: str) -> bool:
        """Whether addr (an IPv4-mapped IPv6 address as its IPv4 address) is one of the
        resolvers."""
        parsed = ip_int(addr)
        if parsed is None:
            return False
        version, value = parsed
        if version == 6 and value >> 32 == 0xFFFF:
            version, value = 4, value & 0xFFFFFFFF
        return (version, value) in self._resolver_ints

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

    def allows(self, addr: str, port: int, hostname: str = "") -> bool:
        """Whether a connect to addr:port passes: addr in a network entry, or hostname (the
        name the sandbox resolved addr as; "" when none) matching a name entry, each with
        its ports."""
        # Sandboxes connect to the same few destinations again and again: answers are kept
        # (a bounded number, forgotten all at once when full; the list never changes).
        key = (addr, port, hostname)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) >= _EGRESS_ANSWERS:
                self._answers.clear()
            answer = self._answers[key] = self._allows(addr, port) or (
                bool(hostname) and self._allows_name(hostname, port)
            )
        return answer

    def _allows_name(self, hostname: str, port: int) -> bool:
        """Whether an entry for hostname itself, or a wildcard for a domain above it, allows
        port: a lookup per label of the name (as name_matches would answer), whatever the
        number of entries."""
        # The event's name is the sandbox's own (a DNS answer, a ClientHello): compared as
        # parse_name keeps the entries, lower case without the root's dot.
        name = hostname.lower().removesuffix(".")
        found = list(self._exact.get(name, ()))
        dot = name.find(".")
        while dot >= 0:
            found += self._below.get(name[dot + 1 :], ())
            dot = name.find(".", dot + 1)
        for ports in found:
            if not ports or any(first <= port <= last for first, last in ports):
                return True
        return False

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


def _resolver(spec: str, text: str) -> Resolver:
    """parse_resolver(text), its error naming the whole entry as given (spec)."""
    try:
        return parse_resolver(text)
    except ValueError as exc:
        raise ValueError(f"resolver {spec!r}: {exc}") from None


def _by_sandbox(
    specs: Iterable[str], what: str, parse: Callable[[str, str], _T]
) -> tuple[list[_T], dict[str, list[_T]]]:
    """``[SANDBOX=]REST`` entries parsed (parse(spec, rest)): those for every sandbox, and
    those of each sandbox named."""
    shared: list[_T] = []
    named: dict[str, list[_T]] = {}
    for spec in specs:
        sandbox, rest = _sandbox_of(spec, what)
        if sandbox:
            named.setdefault(sandbox, []).append(parse(spec, rest))
        else:
            shared.append(parse(spec, spec))
    return shared, named


def _sandbox_of(spec: str, what: str) -> tuple[str, str]:
    """(sandbox, rest) of ``[SANDBOX=]REST``; sandbox "" when there is no prefix."""
    sandbox, sep, rest = spec.partition("=")
    if not sep:
        return "", spec
    if not sandbox:
        raise ValueError(
            f"{what} {spec!r}: no sandbox before '=' (expected SANDBOX=ENTRY or ENTRY)"
        )
    return sandbox, rest


@dataclass(slots=True)
class EgressPolicies:
    """Egress allow-lists per sandbox, and one for every sandbox not named."""

    default: EgressPolicy | None = None
    per_sandbox: dict[str, EgressPolicy] = field(default_factory=dict)

    @classmethod
    def parse(
        cls, specs: Iterable[str], allow_loopback: bool = True, resolvers: Iterable[str] = ()
    ) -> EgressPolicies:
        """Entries as EgressPolicy.parse takes them, each optionally prefixed ``SANDBOX=``
        (a sandbox id) to apply to that sandbox only; a sandbox named in any entry gets
        only its own entries. allow_loopback applies to every list. `resolvers`: DNS
        servers' addresses, ``[SANDBOX=]ADDR``, the same way (shared ones for every policy
        without its own; a sandbox named only there keeps the shared entries, with its own
        resolvers). ValueError names a bad entry, or a sandbox given resolvers but no
        allow-list."""
        shared, named = _by_sandbox(specs, "egress allow-list entry", _entry)
        shared_dns, named_dns = _by_sandbox(resolvers, "resolver", _resolver)
        default = EgressPolicy.of(shared, allow_loopback) if shared else None
        for sandbox in named_dns:
            if sandbox not in named and default is None:
                raise ValueError(
                    f"resolver for sandbox {sandbox!r}, which has no allow-list (expected "
                    f"allow-list entries {sandbox}=... or entries for every sandbox)"
                )
        per_sandbox = {
            name: EgressPolicy.of(entries, allow_loopback) for name, entries in named.items()
        }
        for sandbox in named_dns:
            if sandbox not in per_sandbox and default is not None:
                per_sandbox[sandbox] = default
        if default is not None:
            default = default.with_resolvers(shared_dns)
        for sandbox, policy in per_sandbox.items():
            per_sandbox[sandbox] = policy.with_resolvers(named_dns.get(sandbox, shared_dns))
        return cls(default=default, per_sandbox=per_sandbox)

    def policy_for(self, sandbox: str) -> EgressPolicy | None:
        return self.per_sandbox.get(sandbox, self.default)

    def policies(self) -> list[EgressPolicy]:
        """Every policy: the sandboxes' and the default."""
        return [*self.per_sandbox.values(), *([self.default] if self.default else [])]

    def with_default_resolvers(self, resolvers: Iterable[Resolver]) -> EgressPolicies:
        """These policies, each without resolvers of its own given `resolvers` (the
        nameservers the collector read in resolv.conf): new policies, these unchanged."""
        found = tuple(resolvers)

        def filled(policy: EgressPolicy) -> EgressPolicy:
            return policy if policy.resolvers else policy.with_resolvers(found)

        return EgressPolicies(
            default=filled(self.default) if self.default else None,
            per_sandbox={name: filled(p) for name, p in self.per_sandbox.items()},
        )

    def __len__(self) -> int:
        return sum(len(p.allowed) + len(p.names) for p in self.policies())
