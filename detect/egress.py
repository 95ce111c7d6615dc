"""Egress allow-lists: the destinations each sandbox may connect to.

The engine checks every connect against its sandbox's list and raises EGRESS_RULE for one
outside it.
"""

from __future__ import annotations

import ipaddress
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


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """Destinations a sandbox may connect to: networks, each with optional ports."""

    allowed: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, frozenset[int]], ...] = ()
    # `allowed` as (version, netmask, network, ports) integers
    _ints: list[tuple[int, int, int, frozenset[int]]] = field(
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
    def parse(cls, specs: Iterable[str]) -> EgressPolicy:
        """Entries like ``192.0.2.0/24``, ``198.51.100.7:443``, ``10.0.0.0/8:80,443``,
        ``2001:db8::/32`` and, with ports, ``[2001:db8::/32]:53``. ValueError names a bad one."""
        allowed = []
        for spec in specs:
            if spec.startswith("["):
                net_part, _, rest = spec[1:].partition("]")
                ports_part = rest.removeprefix(":")
            elif spec.count(":") == 1:
                net_part, _, ports_part = spec.partition(":")
            else:
                net_part, ports_part = spec, ""
            try:
                net = ipaddress.ip_network(net_part, strict=False)
                ports = frozenset(int(p) for p in ports_part.split(",") if p)
            except ValueError as exc:
                raise ValueError(f"egress allow-list entry {spec!r}: {exc}") from None
            allowed.append((net, ports))
        return cls(tuple(allowed))

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
        if value >> 24 == 127 if version == 4 else value == 1:
            return True  # the sandbox talking to itself (127.0.0.0/8, ::1)
        for net_version, mask, network, ports in self._ints:
            if net_version == version and value & mask == network and (not ports or port in ports):
                return True
        return False


@dataclass(slots=True)
class EgressPolicies:
    """Egress allow-lists per sandbox, and one for every sandbox not named."""

    default: EgressPolicy | None = None
    per_sandbox: dict[str, EgressPolicy] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> EgressPolicies:
        """Entries as EgressPolicy.parse takes them, each optionally prefixed ``SANDBOX=``
        (a sandbox id) to apply to that sandbox only; a sandbox named in any entry gets
        only its own entries."""
        shared: list[str] = []
        named: dict[str, list[str]] = {}
        for spec in specs:
            sandbox, sep, rest = spec.partition("=")
            if sep:
                named.setdefault(sandbox, []).append(rest)
            else:
                shared.append(spec)
        return cls(
            default=EgressPolicy.parse(shared) if shared else None,
            per_sandbox={name: EgressPolicy.parse(entries) for name, entries in named.items()},
        )

    def policy_for(self, sandbox: str) -> EgressPolicy | None:
        return self.per_sandbox.get(sandbox, self.default)

    def __len__(self) -> int:
        own = sum(len(p.allowed) for p in self.per_sandbox.values())
        return own + (len(self.default.allowed) if self.default else 0)
