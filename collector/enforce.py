"""Egress policies as the kernel enforces them (`--enforce`): EgressPolicies translated into
the tables of probes.enforce, which the sandbox cgroups' own hooks consult
(bpf/include/enforce.h).

Each sandbox's entries are numbered rules, one bit each of a 64-bit mask: networks share a
rule per set of ports (an LPM entry carries the rules of every network of the policy that
contains it, so the longest match answers for all of them); every name or wildcard has a
rule of its own, so that addresses the kernel learnt for a name stop counting the moment the
name leaves the policy (`Enforcer.apply` on a reload). A rule keeps its bit from one apply to
the next; a bit given to a new rule is first taken out of every address learnt under it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from collector.dns import name_hash
from detect.egress import EgressPolicies, EgressPolicy, Network, PortRanges
from probes.enforce import (
    AF_INET,
    AF_INET6,
    F_LOOPBACK,
    F_ON,
    NAME_EXACT,
    NAME_WILDCARD,
    RANGES_MAX,
    RULES_MAX,
    KernelPolicy,
    SandboxTables,
    Tables,
    fnv64,
)

log = structlog.get_logger("sandtrace.enforce")

DEFAULT_TTL_FLOOR = 30.0
"""Seconds an address learnt from a DNS answer stays allowed at least, whatever its TTL: a
program that resolves once and reconnects a little later is not refused."""

RUNTIME_SOCKETS = (
    "docker.sock",
    "dockershim.sock",
    "containerd.sock",
    "podman.sock",
    "crio.sock",
    "cri-dockerd.sock",
    "buildkitd.sock",
    "kubelet.sock",
)
"""File names of container runtimes' and orchestrators' API sockets, as the rule
container_runtime_socket (rules/containers.yml) names them; each also with `.ttrpc`."""

RESOLV_CONF = Path("/etc/resolv.conf")

RuleKey = tuple[str, str, PortRanges]
"""("ports", "", ports): the networks with these ports; ("name", pattern, ports)."""


class EnforceError(ValueError):
    """A policy the kernel cannot hold: says which sandbox and why."""


def runtime_socket_names() -> list[str]:
    return [n for base in RUNTIME_SOCKETS for n in (base, base + ".ttrpc")]


def nameservers(path: Path = RESOLV_CONF) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The `nameserver` addresses of a resolv.conf (a scope suffix %eth0 dropped); none when
    it cannot be read."""
    out = []
    try:
        text = path.read_text()
    except OSError as exc:
        log.warning("resolv.conf unreadable: no resolver allowed", path=str(path), error=str(exc))
        return []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                out.append(ipaddress.ip_address(fields[1].split("%")[0]))
            except ValueError:
                continue
    return out


def _addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, bytes]:
    """(family, 16 bytes) as the kernel keys an address: IPv4 in the first 4 bytes; an
    IPv4-mapped IPv6 address as the IPv4 address it is."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return AF_INET, addr.packed + bytes(12)
    return AF_INET6, addr.packed


def _net6(net: Network) -> tuple[bytes, int]:
    """A network as the kernel's LPM key holds it: IPv6, IPv4 as ::ffff:a.b.c.d/(96+n)."""
    if isinstance(net, ipaddress.IPv4Network):
        return bytes(10) + b"\xff\xff" + net.network_address.packed, 96 + net.prefixlen
    return net.network_address.packed, net.prefixlen


def _contains(outer: tuple[bytes, int], inner: tuple[bytes, int]) -> bool:
    (oa, ob), (ia, ib) = outer, inner
    if ob > ib:
        return False
    shift = 128 - ob
    return int.from_bytes(oa, "big") >> shift == int.from_bytes(ia, "big") >> shift


@dataclass(slots=True)
class _Bits:
    """One sandbox's rule numbering, kept from one apply to the next."""

    by_rule: dict[RuleKey, int] = field(default_factory=dict)
    ever_used: set[int] = field(default_factory=set)


class Enforcer:
    """Holds each sandbox the collector traces to its egress policy, in the kernel.

    `sandboxes` maps sandbox ids (as EgressPolicies names them) to the kernel's sandbox
    index. `apply` may be called again at any time with new policies (a reload)."""

    def __init__(
        self,
        kernel: KernelPolicy,
        sandboxes: Mapping[str, int],
        ttl_floor: float = DEFAULT_TTL_FLOOR,
        resolv_conf: Callable[[], list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = (
            nameservers
        ),
    ) -> None:
        self.kernel = kernel
        self.sandboxes = dict(sandboxes)
        self.floor_ns = int(ttl_floor * 1e9)
        self.resolv_conf = resolv_conf
        self._bits: dict[int, _Bits] = {}

    def apply(self, policies: EgressPolicies) -> None:
        """Hold every sandbox to its policy (a sandbox with none is not enforced); the maps
        change so that a destination both the old and the new policy allow is never
        refused meanwhile. EnforceError says which policy the kernel cannot hold; the
        kernel's tables are then left as they were."""
        tables = Tables(unix_names={fnv64(n.encode()) for n in runtime_socket_names()})
        retire: dict[int, int] = {}
        bits_after: dict[int, _Bits] = {}
        for sandbox, index in self.sandboxes.items():
            policy = policies.policy_for(sandbox)
            if policy is None:
                continue
            bits = self._bits.get(index, _Bits())
            tables.sandboxes[index], bits_after[index], retire[index] = self._tables(
                sandbox, policy, bits
            )
        for index, rules in retire.items():
            if rules:
                self.kernel.forget_rules(index, rules)
        self.kernel.write(tables)
        self._bits = bits_after
        log.info(
            "egress enforced",
            sandboxes=sorted(s for s, i in self.sandboxes.items() if i in tables.sandboxes),
        )

    def _tables(
        self, sandbox: str, policy: EgressPolicy, old: _Bits
    ) -> tuple[SandboxTables, _Bits, int]:
        """A sandbox's tables, its rule numbering after, and the bits that change hands
        (whose learnt addresses must be forgotten first)."""
        keys: list[RuleKey] = []
        for _net, ports in policy.allowed:
            key: RuleKey = ("ports", "", ports)
            if key not in keys:
                keys.append(key)
        keys += [("name", pattern, ports) for pattern, ports in policy.names]
        if len(keys) > RULES_MAX:
            raise EnforceError(
                f"sandbox {sandbox}: {len(policy.names)} names and "
                f"{len(keys) - len(policy.names)} sets of network ports make {len(keys)} "
                f"rules; the kernel holds at most {RULES_MAX} per sandbox"
            )
        bits = _Bits(ever_used=set(old.ever_used))
        retire = 0
        for key in keys:
            if key in old.by_rule:
                bits.by_rule[key] = old.by_rule[key]
        free = [b for b in range(RULES_MAX) if b not in bits.by_rule.values()]
        # bits never used first: their learnt addresses need no forgetting
        free.sort(key=lambda b: b in bits.ever_used)
        for key in keys:
            if key not in bits.by_rule:
                bit = free.pop(0)
                if bit in bits.ever_used:
                    retire |= 1 << bit
                bits.by_rule[key] = bit
                bits.ever_used.add(bit)
        t = SandboxTables(flags=F_ON | (F_LOOPBACK if policy.allow_loopback else 0))
        t.floor_ns = self.floor_ns
        ranges: dict[tuple[int, int], int] = {}
        for (_, _, rule_ports), bit in bits.by_rule.items():
            if not rule_ports:
                t.any_port |= 1 << bit
            for first, last in rule_ports:
                ranges[(first, last)] = ranges.get((first, last), 0) | 1 << bit
        if len(ranges) > RANGES_MAX:
            raise EnforceError(
                f"sandbox {sandbox}: {len(ranges)} distinct port ranges; the kernel holds at "
                f"most {RANGES_MAX} per sandbox"
            )
        t.ranges = [(first, last, rules) for (first, last), rules in sorted(ranges.items())]
        nets = [(_net6(net), bits.by_rule[("ports", "", ports)]) for net, ports in policy.allowed]
        for prefix, _ in nets:
            # the longest match answers for every network of the policy that contains it
            t.nets[prefix] = t.nets.get(prefix, 0) | sum(
                1 << bit for outer, bit in nets if _contains(outer, prefix)
            )
        for pattern, ports in policy.names:
            bit = 1 << bits.by_rule[("name", pattern, ports)]
            if pattern.startswith("*."):
                k = (name_hash(pattern[2:]), NAME_WILDCARD)
            else:
                k = (name_hash(pattern), NAME_EXACT)
            t.names[k] = t.names.get(k, 0) | bit
        resolvers = policy.resolvers or tuple(self.resolv_conf())
        t.resolvers = {_addr16(a) for a in resolvers}
        return t, bits, retire
