"""IP addresses and networks as integers: parsed in C, compared with integer operations.

Rules' |cidr tests and the egress allow-list check every connect's address against
networks; ipaddress's objects and their `in` cost more than the rest of either check.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IP = tuple[int, int]
"""An address as (version, address as an integer)."""

NetInts = tuple[tuple[int, int, int], ...]
"""Networks as (version, netmask, network address) integers."""


def ip_int(addr: str) -> IP | None:
    """(version, address as an integer), or None when `addr` is not an IP address: parsed
    in C by inet_pton where it can be (integer compares then cost less than ipaddress's)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, addr))
    except (OSError, ValueError):
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, addr))
    except (OSError, ValueError):
        pass
    try:
        ip = ipaddress.ip_address(addr)  # scoped IPv6 addresses, which inet_pton refuses
    except ValueError:
        return None
    return ip.version, int(ip)


def net_ints(nets: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> NetInts:
    """Networks as (version, netmask, network address) integers, for in_nets."""
    return tuple((n.version, int(n.netmask), int(n.network_address)) for n in nets)


def in_nets(ip: IP | None, nets: NetInts) -> bool:
    """Whether an address as ip_int gives it lies in one of `nets` (net_ints)."""
    if ip is None:
        return False
    version, value = ip
    for net_version, mask, network in nets:
        if net_version == version and value & mask == network:
            return True
    return False
