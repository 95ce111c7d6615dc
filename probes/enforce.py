"""The kernel's side of egress enforcement (bpf/include/enforce.h): its maps, written whole
from plain tables, and the cgroup attachments a collector that died left behind.

`KernelPolicy.write` replaces what the maps hold with new tables in two passes: first every
entry of the new tables goes in with the rules of the old one kept beside (a destination
either table allows stays allowed), then each entry gets exactly its new value and what the
new tables lack goes. A connect that both the old and the new policy allow is never refused
while the maps change.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sandtrace.enforce")

RANGES_MAX = 32  # ENF_RANGES_MAX
RULES_MAX = 64  # bits of a rules mask
F_ON = 1 << 0  # ENF_F_ON
F_LOOPBACK = 1 << 1  # ENF_F_LOOPBACK
NAME_EXACT = 0
NAME_WILDCARD = 1
KINDS = ("connect", "send", "resolver", "unix")  # enum enf_kind
FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
AF_INET = 2
AF_INET6 = 10


def fnv64(data: bytes) -> int:
    """FNV-1a 64 of bytes, as enf_unix_denied hashes a socket's file name."""
    h = FNV64_OFFSET
    for c in data:
        h = ((h ^ c) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


Address = tuple[int, bytes]
"""(AF_INET or AF_INET6, 16 bytes: an IPv4 address in the first 4)."""


@dataclass(slots=True)
class SandboxTables:
    """What one sandbox's policy is in the kernel's maps."""

    flags: int = F_ON
    any_port: int = 0  # rules that allow every port
    floor_ns: int = 0
    ranges: list[tuple[int, int, int]] = field(default_factory=list)  # (first, last, rules)
    nets: dict[tuple[bytes, int], int] = field(default_factory=dict)  # (v6 addr, bits) -> rules
    names: dict[tuple[int, int], int] = field(default_factory=dict)  # (hash, kind) -> rules
    resolvers: set[Address] = field(default_factory=set)


@dataclass(slots=True)
class Tables:
    """Every enforced sandbox's tables by sandbox index, and the unix socket file names (as
    fnv64 hashes) no sandbox may connect to."""

    sandboxes: dict[int, SandboxTables] = field(default_factory=dict)
    unix_names: set[int] = field(default_factory=set)


class KernelPolicy:
    """The enforcement maps of a loaded BPF object (BCC's)."""

    def __init__(self, bpf: Any) -> None:
        self.bpf = bpf
        self._written = Tables()

    def _table(self, name: str) -> Any:
        return self.bpf[name.encode()]

    def write(self, new: Tables) -> None:
        """Make the maps hold `new` (see the module docstring: never a moment where a
        destination both tables allow is refused)."""
        old = self._written
        self._add(new, old)
        self._settle(new, old)
        self._written = new

    def _sandbox_leaf(self, table: Any, t: SandboxTables) -> Any:
        if len(t.ranges) > RANGES_MAX:
            raise ValueError(f"{len(t.ranges)} port ranges, at most {RANGES_MAX}")
        leaf = table.Leaf()
        leaf.flags = t.flags
        leaf.nranges = len(t.ranges)
        leaf.any_port = t.any_port
        leaf.floor_ns = t.floor_ns
        for i, (first, last, rules) in enumerate(t.ranges):
            leaf.ranges[i].first = first
            leaf.ranges[i].last = last
            leaf.ranges[i].rules = rules
        return leaf

    def _add(self, new: Tables, old: Tables) -> None:
        nets, names = self._table("enf_nets"), self._table("enf_names")
        resolvers, unix = self._table("enf_resolvers"), self._table("enf_unix")
        for sb, t in new.sandboxes.items():
            before = old.sandboxes.get(sb, SandboxTables())
            for (addr, bits), rules in t.nets.items():
                nets[self._net_key(nets, sb, addr, bits)] = nets.Leaf(
                    rules | before.nets.get((addr, bits), 0)
                )
            for (h, kind), rules in t.names.items():
                names[self._name_key(names, sb, h, kind)] = names.Leaf(
                    rules | before.names.get((h, kind), 0)
                )
            for family, addr in t.resolvers:
                resolvers[self._addr_key(resolvers, sb, family, addr)] = resolvers.Leaf(1)
        for h in new.unix_names:
            key = unix.Key()
            key.hash = h
            unix[key] = unix.Leaf(1)
        sandboxes = self._table("enf_sandboxes")
        for sb, t in new.sandboxes.items():
            prev = old.sandboxes.get(sb)
            union = t
            if prev is not None and len(t.ranges) + len(prev.ranges) <= RANGES_MAX:
                union = SandboxTables(
                    flags=t.flags | (prev.flags & F_LOOPBACK),
                    any_port=t.any_port | prev.any_port,
                    floor_ns=max(t.floor_ns, prev.floor_ns),
                    ranges=[*t.ranges, *prev.ranges],
                )
            sandboxes[sandboxes.Key(sb)] = self._sandbox_leaf(sandboxes, union)

    def _settle(self, new: Tables, old: Tables) -> None:
        sandboxes, nets, names = (
            self._table("enf_sandboxes"),
            self._table("enf_nets"),
            self._table("enf_names"),
        )
        resolvers, unix = self._table("enf_resolvers"), self._table("enf_unix")
        for sb, t in new.sandboxes.items():
            sandboxes[sandboxes.Key(sb)] = self._sandbox_leaf(sandboxes, t)
            for (addr, bits), rules in t.nets.items():
                nets[self._net_key(nets, sb, addr, bits)] = nets.Leaf(rules)
            for (h, kind), rules in t.names.items():
                names[self._name_key(names, sb, h, kind)] = names.Leaf(rules)
        for sb, before in old.sandboxes.items():
            after = new.sandboxes.get(sb)
            if after is None:
                _delete(sandboxes, sandboxes.Key(sb))
                after = SandboxTables()
            t = after
            for addr, bits in before.nets.keys() - t.nets.keys():
                _delete(nets, self._net_key(nets, sb, addr, bits))
            for h, kind in before.names.keys() - t.names.keys():
                _delete(names, self._name_key(names, sb, h, kind))
            for family, addr in before.resolvers - t.resolvers:
                _delete(resolvers, self._addr_key(resolvers, sb, family, addr))
        for h in old.unix_names - new.unix_names:
            key = unix.Key()
            key.hash = h
            _delete(unix, key)

    @staticmethod
    def _net_key(table: Any, sb: int, addr: bytes, bits: int) -> Any:
        key = table.Key()
        key.prefixlen = 32 + bits
        key.sandbox = sb
        key.addr[:] = list(addr)
        return key

    @staticmethod
    def _name_key(table: Any, sb: int, h: int, kind: int) -> Any:
        key = table.Key()
        key.hash = h
        key.sandbox = sb
        key.kind = kind
        return key

    @staticmethod
    def _addr_key(table: Any, sb: int, family: int, addr: bytes) -> Any:
        key = table.Key()
        key.sandbox = sb
        key.family = family
        key.addr[:] = list(addr)
        return key

    def forget_rules(self, sb: int, rules: int) -> int:
        """Take `rules` out of every address sandbox sb learnt (before their bits are given
        to other rules); entries left with no rule go. Returns how many entries changed."""
        table = self._table("enf_learned")
        changed = 0
        for key, val in list(table.items()):
            if key.sandbox != sb or not val.rules & rules:
                continue
            rest = val.rules & ~rules
            if rest:
                val.rules = rest
                table[key] = val
            else:
                _delete(table, key)
            changed += 1
        return changed

    def learned(self, sb: int) -> dict[Address, tuple[int, int]]:
        """The addresses sandbox sb learnt from DNS answers: -> (rules, expiry in
        CLOCK_MONOTONIC ns)."""
        return {
            (k.family, bytes(k.addr)): (v.rules, v.expires_ns)
            for k, v in self._table("enf_learned").items()
            if k.sandbox == sb
        }

    def denied(self) -> dict[str, int]:
        """Denials the kernel counted, by kind (enum enf_kind)."""
        table = self._table("enf_denied")
        return {kind: sum(int(v) for v in table[table.Key(i)]) for i, kind in enumerate(KINDS)}


def _delete(table: Any, key: Any) -> None:
    with contextlib.suppress(KeyError):
        del table[key]


# -- attachments a collector left behind -------------------------------------------------------

_SYS_BPF = 321  # x86_64
_BPF_PROG_ATTACH = 8
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_MAP_GET_FD_BY_ID = 14
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
_PROG_NAME_OFFSET = 64  # struct bpf_prog_info: name[16]
_PROG_NR_MAP_IDS = 52
_PROG_MAP_IDS = 56
_MAP_NAME_OFFSET = 24  # struct bpf_map_info: name[16]
OWN_MAP = b"sandbox_cgroups"
"""A map every sandtrace program uses (scope.h): a program that holds it is sandtrace's."""

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = int(_libc.syscall(_SYS_BPF, cmd, attr, len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """A zeroed union bpf_attr of 128 bytes with (offset, struct format, value) set."""
    import struct  # noqa: PLC0415

    buf = ctypes.create_string_buffer(128)
    for off, fmt, value in fields:
        struct.pack_into(fmt, buf, off, value)
    return buf


def attached_programs(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached to a cgroup (itself, not inherited) at one hook."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _attr(
        (0, "<I", cgroup_fd),
        (4, "<I", attach_type),
        (16, "<Q", ctypes.addressof(ids)),
        (24, "<I", 64),
    )
    try:
        _bpf(_BPF_PROG_QUERY, attr)
    except OSError:
        return []
    count = int.from_bytes(attr.raw[24:28], "little")
    return list(ids[: min(count, 64)])


def _info(fd: int, size: int) -> bytes:
    info = ctypes.create_string_buffer(size)
    attr = _attr((0, "<I", fd), (4, "<I", size), (8, "<Q", ctypes.addressof(info)))
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    return info.raw


def program_identity(prog_id: int) -> tuple[int, str, bool] | None:
    """(an fd of program prog_id, its name, whether it is sandtrace's: it uses OWN_MAP), or
    None when it is gone. The caller closes the fd."""
    try:
        fd = _bpf(_BPF_PROG_GET_FD_BY_ID, _attr((0, "<I", prog_id)))
    except OSError:
        return None
    map_ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(256)
    # nr_map_ids and map_ids ask the kernel for the ids of the maps the program uses
    import struct  # noqa: PLC0415

    struct.pack_into("<I", info, _PROG_NR_MAP_IDS, 64)
    struct.pack_into("<Q", info, _PROG_MAP_IDS, ctypes.addressof(map_ids))
    attr = _attr((0, "<I", fd), (4, "<I", 256), (8, "<Q", ctypes.addressof(info)))
    try:
        _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    except OSError:
        os.close(fd)
        return None
    name = info.raw[_PROG_NAME_OFFSET : _PROG_NAME_OFFSET + 16].split(b"\0")[0].decode()
    nr = struct.unpack_from("<I", info.raw, _PROG_NR_MAP_IDS)[0]
    ours = False
    for map_id in map_ids[: min(nr, 64)]:
        try:
            map_fd = _bpf(_BPF_MAP_GET_FD_BY_ID, _attr((0, "<I", map_id)))
        except OSError:
            continue
        try:
            raw = _info(map_fd, 96)
        except OSError:
            continue
        finally:
            os.close(map_fd)
        if raw[_MAP_NAME_OFFSET : _MAP_NAME_OFFSET + 16].split(b"\0")[0] == OWN_MAP:
            ours = True
            break
    return fd, name, ours


def held_program_ids(pids: Iterable[int] | None = None) -> set[int]:
    """Ids of the BPF programs some process holds open (their fdinfo's prog_id): a program
    attached to a cgroup that no process holds was left by a collector that is gone."""
    held: set[int] = set()
    procs = (
        pids
        if pids is not None
        else (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    )
    for pid in procs:
        fd_dir = Path(f"/proc/{pid}/fdinfo")
        try:
            entries = list(fd_dir.iterdir())
        except OSError:
            continue
        for entry in entries:
            try:
                text = entry.read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("prog_id:"):
                    held.add(int(line.split()[1]))
    return held


def orphans(cgroup_fd: int, attach_type: int, name: str, held: set[int]) -> list[tuple[int, int]]:
    """sandtrace's programs called `name` attached to the cgroup at this hook that no
    process holds (a collector that died left them, still running): (id, fd) each."""
    out = []
    for prog_id in attached_programs(cgroup_fd, attach_type):
        if prog_id in held:
            continue
        found = program_identity(prog_id)
        if found is None:
            continue
        fd, prog_name, ours = found
        if ours and prog_name == name:
            out.append((prog_id, fd))
        else:
            os.close(fd)
    return out


def attach_replacing(prog_fd: int, cgroup_fd: int, attach_type: int, old_fd: int | None) -> None:
    """Attach a program to a cgroup beside the others there (BPF_F_ALLOW_MULTI); in the
    place of `old_fd`'s program, in one step, when given (BPF_F_REPLACE), so that the hook
    never runs without one of them."""
    flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if old_fd is not None else 0)
    attr = _attr(
        (0, "<I", cgroup_fd),
        (4, "<I", prog_fd),
        (8, "<I", attach_type),
        (12, "<I", flags),
        (16, "<I", old_fd or 0),
    )
    _bpf(_BPF_PROG_ATTACH, attr)


def monotonic_ns() -> int:
    """The clock of the kernel's expiries (bpf_ktime_get_ns)."""
    return time.monotonic_ns()
