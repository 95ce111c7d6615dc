"""Kernel records -> typed events, with process context from the collector's tables.

Pure: no BCC, no root. The one piece of state beyond the tables is the join of a TCP
connect (seen at the cgroup hook, before the protocol acts) with its outcome (seen on the
TCP state tracepoint): see README, "connect outcomes".
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from api.events import (
    AnyEvent,
    BindEvent,
    CgroupMoveEvent,
    ConnectEvent,
    DnsEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    IoUringEvent,
    ListenEvent,
    Process,
    RawSocketEvent,
    SocketEvent,
)
from collector import dns as dns_mod
from collector import flows as flows_mod
from collector import records as R
from collector.proctable import ExecIdentity, Names, ProcessTable
from collector.sockets import HeldSocket, UnixListener, UnixListeners
from collector.stdio import from_record as stdio_from_record

TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_CLOSE = 7
TCP_LISTEN = 10
SOCK_STREAM = 1
SOCK_DGRAM = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
AF_INET = 2
AF_INET6 = 10
AF_PACKET = 17

# The key of the cached event context: the header's fields from cgroup_id to comm (all but
# type, version, size and time), h[4:14] of any record.
_ContextKey = tuple[object, ...]
_CONTEXT_CACHE_MAX = 4096

CONNECT_HOLD_NS = 300_000_000
"""How long a TCP connect waits for its handshake outcome before it is shown as pending."""
FLOW_HOLD_NS = 100_000_000
"""Where flows are classified (Assembler(flow_hold_ns=...)): how long a connect, once its
outcome is known, waits for the first bytes of its flow, either way, so that the event
carries what the flow speaks. Client and server alike speak within a round trip of the
handshake in every protocol classified; a flow silent for longer goes without."""
DNS_NAMES_MAX = 65536
"""Addresses remembered per host with the name a sandbox resolved them as (oldest dropped)."""
DNS_NAME_MIN_KEEP_NS = 300_000_000_000
"""An answer names its addresses for its TTL, but at least this long: answers with TTL 0
are common, and the connect comes after the answer."""
FLOWS_MAX = 16384
"""Sockets whose first bytes are remembered (oldest dropped), for connects seen after them
(a datagram socket's sends to more destinations)."""


def fmt_addr(family: int, raw: bytes) -> str:
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[:16])
    return ""


def family_name(family: int) -> str:
    return {AF_INET: "ipv4", AF_INET6: "ipv6", AF_PACKET: "packet"}.get(family, f"af/{family}")


def protocol_name(sock_type: int, protocol: int) -> str:
    if protocol == IPPROTO_TCP or (protocol == 0 and sock_type == SOCK_STREAM):
        return "tcp"
    if protocol == IPPROTO_UDP or (protocol == 0 and sock_type == SOCK_DGRAM):
        return "udp"
    return f"ip/{protocol}"


IP_PROTOCOLS = {
    0: "ip",
    1: "icmp",
    2: "igmp",
    6: "tcp",
    17: "udp",
    58: "icmpv6",
    132: "sctp",
    255: "raw",
}


def ip_protocol_name(protocol: int) -> str:
    return IP_PROTOCOLS.get(protocol, f"ip/{protocol}")


# Ethertypes a packet socket is asked for (linux/if_ether.h): 0 receives nothing until bound.
ETHERTYPES = {0: "none", 0x0003: "all", 0x0800: "ip", 0x0806: "arp", 0x86DD: "ipv6"}


def socket_protocol_name(family: int, protocol: int) -> str:
    """A raw socket's protocol: the IP protocol, or a packet socket's ethertype."""
    if family == AF_PACKET:
        return ETHERTYPES.get(protocol, f"eth/0x{protocol:04x}")
    return ip_protocol_name(protocol)


def errno_name(err: int) -> str:
    return errno_mod.errorcode.get(err, f"E{err}")


@dataclass(slots=True)
class Scope:
    """One traced scope: a sandbox id and the cgroup paths (relative to the cgroup2 root)."""

    name: str
    cgroup_paths: list[str] = field(default_factory=list)


def _unresolved(ev: ConnectEvent) -> ConnectEvent:
    """A TCP connect whose handshake outcome did not come within the hold time."""
    if ev.nonblocking:
        # What the call itself returned; the handshake goes on without it.
        ev.outcome = "in_progress"
        ev.errno = errno_mod.EINPROGRESS
        ev.errno_name = "EINPROGRESS"
    else:
        ev.outcome = "pending"
    return ev


# What an event's fields owe to its header and the collector's tables, but its time: host,
# sandbox, cgroup_id, cgroup_path, container_id, process (api.events.Event's fields after
# time_ns and mono_ns, in their order).
_Context = tuple[str, str, int, str, str, Process]
# Every event's common fields, in order: the first positional arguments of its constructor
# (positional, not keywords: half the cost of building an event of few fields).
_Common = tuple[int, int, str, str, int, str, str, Process]
_COMMON_FIELDS: tuple[str, ...] = ("time_ns", "mono_ns", "host", "sandbox", "cgroup_id")
_COMMON_FIELDS += ("cgroup_path", "container_id", "process")
if Event.__struct_fields__[: len(_COMMON_FIELDS)] != _COMMON_FIELDS:
    raise TypeError(f"Event's first fields are not {_COMMON_FIELDS}: see Assembler._common")


@dataclass(slots=True)
class _PendingConnect:
    event: ConnectEvent
    deadline_ns: int
    resolved: bool = False  # the outcome is known; waiting for the flow's first bytes


@dataclass(slots=True)
class FlowInfo:
    """What a socket's first bytes said (collector.flows), from either direction."""

    app_protocol: str = ""
    sni: str = ""
    http_host: str = ""
    detail: str = ""

    def merge(self, other: FlowInfo) -> None:
        """Add what the other direction said: a protocol told is kept over "unknown"."""
        if not self.app_protocol or (self.app_protocol == "unknown" and other.app_protocol):
            self.app_protocol = other.app_protocol
        self.sni = self.sni or other.sni
        self.http_host = self.http_host or other.http_host
        self.detail = self.detail or other.detail


def flow_info(rec: R.FlowRecord) -> FlowInfo:
    """A flow record's protocol and what its bytes name (SNI, Host, method, banner)."""
    payload = rec.payload[: min(rec.payload_size, R.FLOW_PAYLOAD_MAX)]
    app = R.APPLICATION_NAMES.get(rec.app, "") or "unknown"
    info = FlowInfo(app)
    if app == "tls" and not rec.flags & R.FLOW_F_INGRESS:
        info.sni = flows_mod.tls_server_name(payload)
    elif app == "http" and not rec.flags & R.FLOW_F_INGRESS:
        info.http_host = flows_mod.http_host(payload)
        info.detail = flows_mod.http_request_line(payload)
    elif app == "stratum":
        info.detail = flows_mod.stratum_method(payload)
    elif app == "ssh":
        info.detail = flows_mod.http_request_line(payload)  # the banner's line
    return info


class KnownFile(Protocol):
    """What the identity cache tells of an executed file (collector.identity.Identity)."""

    @property
    def sha256(self) -> str: ...
    @property
    def original_exe(self) -> bytes: ...
    @property
    def go_module(self) -> str: ...


class Assembler:
    """Turns decoded records into events; keeps the process table and pending connects."""

    def __init__(
        self,
        scopes: list[Scope],
        cgroup_path: Callable[[int], str],
        container_id: Callable[[str], str],
        *,
        host: str | None = None,
        procs: ProcessTable | None = None,
        names: Names | None = None,
        unix_listener: Callable[[int, bytes], UnixListener | None] | None = None,
        flow_hold_ns: int = 0,
    ) -> None:
        self.scopes = scopes
        self._cgroup_path = cgroup_path
        self._container_id = container_id
        self.host = host or socket.gethostname()
        self.procs = procs or ProcessTable()
        self.names = names or Names()
        # Who listens on a unix socket address, as a process sees it (collector.sockets).
        self.unix_listener = unix_listener or UnixListeners().find
        self._pending: dict[int, _PendingConnect] = {}
        # With flows classified in the kernel: how long a connect waits for its first bytes.
        self.flow_hold_ns = flow_hold_ns
        self._flows: OrderedDict[int, FlowInfo] = OrderedDict()  # socket cookie -> first bytes
        # (sandbox index, address) -> (name resolved, until when: CLOCK_MONOTONIC ns)
        self._names: OrderedDict[tuple[int, str], tuple[str, int]] = OrderedDict()
        self._context_cache: dict[_ContextKey, _Context] = {}
        self._context_keys: dict[int, list[_ContextKey]] = {}  # pid -> contexts that show it
        self._cgroups: dict[tuple[int, int], tuple[str, str, str]] = {}
        # id() of each exec event of the last feed_batches() -> its file's version as the
        # kernel read it at exec (st_dev, st_ino, st_ctime_ns, st_size), where it did: the
        # key of the identity cache (collector/identity.py), which then needs no stat.
        self.exec_file_keys: dict[int, tuple[int, int, int, int]] = {}
        # The identity of a file the identity cache holds, by that key, or None
        # (ExecEnricher.known_at_exec); None: every exec event goes to the enricher.
        self.known_file: Callable[[tuple[int, int, int, int]], KnownFile | None] | None = None
        # id() of each exec event of the last feed_batches() that is complete as it is (its
        # file known by its key, its streams captured at exec): the enricher skips it.
        self.exec_complete: set[int] = set()
        self._wall_offset = 0
        self.sync_clock()

    def sync_clock(self) -> None:
        """Offset from CLOCK_MONOTONIC (the kernel's timestamps) to the wall clock."""
        self._wall_offset = time.time_ns() - time.monotonic_ns()

    def sandbox_name(self, index: int) -> str:
        if 0 <= index < len(self.scopes):
            return self.scopes[index].name
        return f"scope-{index}"

    def in_scope_path(self, path: str) -> bool:
        for scope in self.scopes:
            for root in scope.cgroup_paths:
                if root in ("/", path) or path.startswith(root.rstrip("/") + "/"):
                    return True
        return False

    # -- common context ---------------------------------------------------------------------

    def _process(self, h: R.Header | R.AnyRecord) -> Process:
        info = self.procs.get(h.pid)
        key = f"{h.pid}@{h.start_ns}"
        exe, argv = (
            (info.exe, list(info.argv)) if info is not None and info.key == key else (b"", [])
        )
        process = Process(
            pid=h.pid,
            tid=h.tid,
            ns_pid=h.ns_pid,
            ppid=h.ppid,
            uid=h.uid,
            gid=h.gid,
            comm=h.comm.split(b"\0", 1)[0],
            start_ns=h.start_ns,
            key=key,
            exe=exe,
            argv=argv,
            user=self.names.user(h.uid),
            group=self.names.group(h.gid),
            ancestry=self.procs.ancestry(h.pid),
        )
        ident = info.ident if info is not None and info.key == key else None
        if ident is not None:  # its program's, from its completed exec (identify)
            process.sha256, process.original_exe = ident.sha256, ident.original_exe
            process.go_module, process.cwd = ident.go_module, ident.cwd
            process.filename = ident.filename
        return process

    def _common(self, h: R.Header | R.AnyRecord) -> _Common:
        # Everything but the time depends only on header fields and the process table, so
        # the events of one process build their context once. A change to the table drops
        # only the contexts that show the process it changed (see _forget).
        key: _ContextKey = h[4:14]  # cgroup_id .. comm
        context = self._context_cache.get(key)
        if context is None:
            if len(self._context_cache) >= _CONTEXT_CACHE_MAX:
                self._context_cache.clear()
                self._context_keys.clear()
            sandbox, path, container_id = self._cgroup_context(h.cgroup_id, h.sandbox)
            process = self._process(h)
            context = (self.host, sandbox, h.cgroup_id, path, container_id, process)
            self._context_cache[key] = context
            keys = self._context_keys
            for pid in (h.pid, h.ppid, *[a.pid for a in process.ancestry]):
                keys.setdefault(pid, []).append(key)
        return (h.ktime_ns + self._wall_offset, h.ktime_ns, *context)

    def _cgroup_context(self, cgroup_id: int, sandbox: int) -> tuple[str, str, str]:
        """(sandbox name, cgroup path, container id) of a cgroup, cached once its path is
        known (a path not found yet may be found by a later rescan)."""
        found = self._cgroups.get((cgroup_id, sandbox))
        if found is None:
            path = self._cgroup_path(cgroup_id)
            found = (self.sandbox_name(sandbox), path, self._container_id(path))
            if path:
                if len(self._cgroups) >= _CONTEXT_CACHE_MAX:
                    self._cgroups.clear()
                self._cgroups[(cgroup_id, sandbox)] = found
        return found

    def _forget(self, pid: int) -> None:
        """Drop the cached contexts that show process `pid` as it was: its own, its
        children's (their ppid) and its descendants' (their ancestry). Called before the
        table changes it: an exec (new exe and argv), a fork (a new child, maybe one whose
        own children came first), a move to another cgroup. An exit changes nothing a
        context shows."""
        keys = self._context_keys.pop(pid, None)
        if keys:
            cache = self._context_cache
            for key in keys:
                cache.pop(key, None)

    def identify(self, pid: int, key: str, ident: ExecIdentity) -> None:
        """Remember what process `pid` (`key`) now runs, from its completed exec event (or
        its parent's, for a child forked before that was known): the events of the process
        that follow, and of the children it forks, carry it (Process.sha256 ...)."""
        info = self.procs.get(pid)
        if info is None or info.key != key:
            return
        info.ident = ident
        self._forget(pid)

    # -- records ----------------------------------------------------------------------------

    def feed_batches(self, batches: Iterable[Iterable[bytes]]) -> tuple[list[AnyEvent], list[str]]:
        """Decode and assemble raw records; returns the events and, per record that could
        not be decoded, why."""
        events: list[AnyEvent] = []
        errors: list[str] = []
        self.exec_file_keys = {}
        self.exec_complete = set()
        decode, feed, extend = R.decode_record, self.feed, events.extend  # per record
        for batch in batches:
            for buf in batch:
                try:
                    extend(feed(decode(buf)))
                except R.RecordError as exc:
                    errors.append(f"{exc} ({len(buf)} bytes)")
        return events, errors

    def feed(self, rec: R.AnyRecord) -> list[AnyEvent]:
        """Events for one record (often one, none while a connect awaits its outcome)."""
        # A process's fork, exec and exit first: a third each of what a busy sandbox sends.
        # A record that changes the table drops the cached contexts that showed it first.
        if type(rec) is R.ExecRecord:
            self._forget(rec.pid)
            if self._pending:  # connects made before it go out before it
                return [*self._flush_lineage(rec.pid), self._exec(rec)]
            return [self._exec(rec)]
        if type(rec) is R.ForkRecord:
            self._forget(rec.child_pid)
            return [self._fork(rec)]
        if type(rec) is R.ExitRecord:
            return self._exit(rec)
        if type(rec) is R.CgroupMoveRecord:
            self._forget(rec.target_pid)
        match rec:
            case R.ConnectRecord():
                return self._connect(rec)
            case R.TcpStateRecord():
                return self._tcp_state(rec)
            case R.BindRecord():
                return [self._bind(rec)]
            case R.ExecRecord():
                return [self._exec(rec)]
            case R.ForkRecord():
                return [self._fork(rec)]
            case R.ExitRecord():
                return self._exit(rec)
            case R.CgroupMoveRecord():
                return [self._cgroup_move(rec)]
            case R.UnixConnectRecord():
                return [self._unix_connect(rec)]
            case R.SockCreateRecord():
                return [
                    RawSocketEvent(
                        *self._common(rec),
                        family=family_name(rec.family),
                        protocol=socket_protocol_name(rec.family, rec.protocol),
                        protocol_number=rec.protocol,
                    )
                ]
            case R.FlowRecord():
                return self._flow(rec)
            case R.DnsRecord():
                return [self._dns(rec)]
            case R.IoUringRecord():
                return [
                    IoUringEvent(
                        *self._common(rec),
                        fd=rec.fd,
                        sq_entries=rec.sq_entries,
                        cq_entries=rec.cq_entries,
                        flags=rec.flags,
                    )
                ]

    def held_socket(self, h: R.Header, sock: HeldSocket) -> SocketEvent:
        """A socket the process already held when tracing started."""
        return SocketEvent(
            *self._common(h),
            protocol=sock.protocol,
            family=sock.family,
            state=sock.state,
            laddr=sock.laddr,
            lport=sock.lport,
            raddr=sock.raddr,
            rport=sock.rport,
        )

    def _exec(self, f: R.ExecRecord) -> ExecEvent:
        parts = R.exec_parts(f)
        # Captured at exec; [] when the kernel could not, for the enricher to read /proc.
        stdio = stdio_from_record(f, parts.stdio_names)
        # The kernel tells a memfd (its file has no path at all) from a deleted file.
        fileless = bool(f.flags & R.EXEC_F_MEMFD)
        unlinked = bool(f.flags & R.EXEC_F_UNLINKED)
        parent = self.procs.get(f.ppid)
        info = self.procs.on_exec(f.pid, f.start_ns, f.ppid, parts.exe, parts.argv)
        file_key = None
        if f.flags & R.EXEC_F_FILE_KEY:
            dev = os.makedev(f.exe_dev >> 20, f.exe_dev & 0xFFFFF)  # as stat(2) encodes it
            file_key = (dev, f.exe_ino, f.exe_ctime_ns, f.exe_file_size)
        # The common case needs no enricher: a file the identity cache knows by the kernel's
        # key, streams captured at exec. The process is then known to run it from this
        # event on (its context and its children's are built with it).
        known = (
            self.known_file(file_key)
            if file_key is not None and stdio and self.known_file is not None
            else None
        )
        sha256, original_exe, go_module = "", b"", ""
        if known is not None:
            sha256, original_exe, go_module = known.sha256, known.original_exe, known.go_module
            info.ident = ExecIdentity(sha256, original_exe, go_module, parts.cwd, parts.filename)
        ev = ExecEvent(
            *self._common(f),
            argv=parts.argv,
            argv_truncated=bool(f.flags & R.EXEC_F_ARGV_TRUNCATED),
            argv_size=f.argv_full_size,
            cwd=parts.cwd,
            filename=parts.filename,
            exe_inode=f.exe_ino,
            fileless=fileless,
            deleted=unlinked and not fileless,
            path_truncated=bool(f.flags & (R.EXEC_F_EXE_TRUNCATED | R.EXEC_F_CWD_TRUNCATED)),
            parent_exe=parent.exe if parent is not None else b"",
            parent_argv=list(parent.argv) if parent is not None else [],
            sha256=sha256,
            original_exe=original_exe,
            go_module=go_module,
            stdio=stdio,
        )
        if known is not None:
            self.exec_complete.add(id(ev))
        elif file_key is not None:
            self.exec_file_keys[id(ev)] = file_key
        return ev

    def _fork(self, f: R.ForkRecord) -> ForkEvent:
        self.procs.on_fork(f.pid, f.child_pid, f.child_start_ns)
        return ForkEvent(
            *self._common(f),
            child_pid=f.child_pid,
            child_key=f"{f.child_pid}@{f.child_start_ns}",
        )

    def _exit(self, f: R.ExitRecord) -> list[AnyEvent]:
        out: list[AnyEvent] = [*self._flush_pending(pid=f.pid)]
        code = f.exit_code
        out.append(
            ExitEvent(
                *self._common(f),
                exit_code=(code >> 8) & 0xFF,
                signal=code & 0x7F,
                core_dumped=bool(code & 0x80),
            )
        )
        self.procs.on_exit(f.pid)
        return out

    def _cgroup_move(self, f: R.CgroupMoveRecord) -> CgroupMoveEvent:
        path = f.dst_path.split(b"\0", 1)[0].decode("utf-8", "replace")
        return CgroupMoveEvent(
            *self._common(f),
            target_pid=f.target_pid,
            dst_cgroup_id=f.dst_cgroup_id,
            dst_cgroup_path=path,
            left_sandbox=not self.in_scope_path(path),
        )

    def _connect(self, f: R.ConnectRecord) -> list[AnyEvent]:
        ev = ConnectEvent(
            *self._common(f),
            protocol=protocol_name(f.sock_type, f.protocol),
            family=family_name(f.family),
            daddr=fmt_addr(f.family, f.daddr),
            dport=f.dport,
            saddr=fmt_addr(f.family, f.saddr) if f.flags & R.SOCK_F_LOCAL_KNOWN else "",
            sport=f.sport,
            repeats=f.repeats,
            denied=bool(f.flags & R.SOCK_F_DENIED),
        )
        self._name(ev, f.sandbox)
        if f.flags & R.SOCK_F_REPEATS_ONLY:
            # Only a count of repeats the kernel held: no connect, no outcome to wait for.
            ev.outcome = "repeated"
            return [ev]
        if ev.denied:
            # Refused by the kernel (EPERM): no packet went, nothing more will come of it.
            ev.outcome, ev.errno, ev.errno_name = "denied", errno_mod.EPERM, "EPERM"
            return [ev]
        if f.flags & R.SOCK_F_UNCONNECTED:
            # The first datagram of a socket to this destination, sent without connect().
            ev.outcome = "sent"
            return self._await_flow(ev, f.cookie, f.ktime_ns)
        if ev.protocol != "tcp":
            # Datagram connect only sets the peer; the hook runs as the call does.
            ev.outcome = "success"
            return self._await_flow(ev, f.cookie, f.ktime_ns)
        self._pending[f.cookie] = _PendingConnect(ev, f.ktime_ns + CONNECT_HOLD_NS)
        return []

    # -- names and protocols ----------------------------------------------------------------

    def _name(self, ev: ConnectEvent, sandbox: int) -> None:
        """The name the sandbox resolved the destination as, when an answer it received
        (still holding) gave it."""
        entry = self._names.get((sandbox, ev.daddr))
        if entry is not None and entry[1] >= ev.mono_ns:
            ev.hostname, ev.hostname_source = entry[0], "dns"

    def _classify(self, ev: ConnectEvent, info: FlowInfo) -> None:
        ev.app_protocol = info.app_protocol
        ev.sni = info.sni
        ev.http_host = info.http_host
        ev.app_detail = info.detail
        if not ev.hostname and info.sni:
            ev.hostname, ev.hostname_source = info.sni, "sni"

    def _await_flow(self, ev: ConnectEvent, cookie: int, now_ns: int) -> list[AnyEvent]:
        """A connect whose outcome is known: out now with what its flow's first bytes said,
        or held for them (flow_hold_ns) when they have not come yet. A datagram socket that
        connects again (or sends to another destination) ends the wait of the connect held
        before on it: the bytes that follow are the new one's, so the old one goes out now,
        not a whole hold later."""
        info = self._flows.get(cookie)
        if info is not None:
            self._classify(ev, info)
            return [ev]
        if not self.flow_hold_ns:
            return [ev]
        held = self._pending.get(cookie)
        if held is not None and not held.resolved:
            return [ev]
        self._pending[cookie] = _PendingConnect(ev, now_ns + self.flow_hold_ns, resolved=True)
        return [] if held is None else [held.event]

    def _flow(self, f: R.FlowRecord) -> list[AnyEvent]:
        info = flow_info(f)
        known = self._flows.get(f.cookie)
        if known is not None:
            known.merge(info)
            info = known
        else:
            self._flows[f.cookie] = info
            if len(self._flows) > FLOWS_MAX:
                self._flows.popitem(last=False)
        pend = self._pending.get(f.cookie)
        if pend is None:
            return []
        self._classify(pend.event, info)
        if not pend.resolved:
            return []  # the handshake's outcome is still awaited
        del self._pending[f.cookie]
        return [pend.event]

    def _dns(self, f: R.DnsRecord) -> DnsEvent:
        payload = f.payload[: min(f.payload_size, R.DNS_PAYLOAD_MAX)]
        ev = DnsEvent(
            *self._common(f),
            resolver=fmt_addr(f.family, f.server),
            resolver_port=f.server_port,
            protocol=protocol_name(0, f.protocol),
            mapped=f.mapped,
            truncated=f.payload_full > f.payload_size,
        )
        # over TCP, payload_full is the message's length prefix: a segment that ended before
        # it (and before the capture's limit) holds only the start of the message
        split = ev.protocol == "tcp" and f.payload_size < min(f.payload_full, R.DNS_PAYLOAD_MAX)
        if split:
            ev.error = dns_mod.split_error(f.payload_size, f.payload_full)
        try:
            msg = dns_mod.parse(payload)
        except dns_mod.DnsError as exc:
            ev.error = ev.error or str(exc)
            return ev
        ev.query_name = msg.query_name
        ev.query_type = msg.query_type
        ev.rcode = msg.rcode
        ev.rcode_name = dns_mod.rcode_name(msg.rcode)
        ev.transaction_id = msg.id
        ev.truncated = ev.truncated or msg.truncated
        ev.addresses = msg.addresses
        ev.cnames = msg.chain()[1:]
        ev.answers = [f"{a.type} {a.data}".rstrip() for a in msg.answers]
        ev.ttl = msg.min_ttl()
        if msg.response and msg.rcode == 0 and msg.query_name:
            until = f.ktime_ns + max(ev.ttl * 1_000_000_000, DNS_NAME_MIN_KEEP_NS)
            for addr in ev.addresses:
                key = (f.sandbox, addr)
                self._names.pop(key, None)
                self._names[key] = (msg.query_name, until)
            while len(self._names) > DNS_NAMES_MAX:
                self._names.popitem(last=False)
        return ev

    def _unix_connect(self, f: R.UnixConnectRecord) -> ConnectEvent:
        """A connect to a unix socket. The hook runs before the address is looked up, so
        the outcome is not known (""); the listener is looked up now, while it may still be
        there."""
        path = R.unix_path(f)
        if f.flags & R.UNIX_F_DENIED:
            # Refused by the kernel (EPERM) before the path was looked up.
            return ConnectEvent(
                *self._common(f),
                protocol="unix",
                family="unix",
                path=path,
                outcome="denied",
                errno=errno_mod.EPERM,
                errno_name="EPERM",
                denied=True,
            )
        peer = self.unix_listener(f.pid, path) if path else None
        return ConnectEvent(
            *self._common(f),
            protocol="unix",
            family="unix",
            path=path,
            peer_pid=peer.pid if peer is not None else 0,
            peer_exe=peer.exe if peer is not None else b"",
        )

    def _tcp_state(self, f: R.TcpStateRecord) -> list[AnyEvent]:
        common = self._common(f)
        if f.newstate == TCP_LISTEN:
            return [
                ListenEvent(
                    *common,
                    family=family_name(f.family),
                    addr=fmt_addr(f.family, f.saddr),
                    port=f.sport,
                )
            ]
        pend = self._pending.get(f.cookie)
        if f.newstate == TCP_SYN_SENT:
            if pend is None:
                # No hook record: the process connected from a cgroup without hooks.
                ev = ConnectEvent(
                    *common,
                    protocol="tcp",
                    family=family_name(f.family),
                    daddr=fmt_addr(f.family, f.daddr),
                    dport=f.dport,
                )
                self._name(ev, f.sandbox)
                pend = _PendingConnect(ev, f.ktime_ns + CONNECT_HOLD_NS)
                self._pending[f.cookie] = pend
            # A non-blocking call returns EINPROGRESS here; its handshake's outcome is still
            # awaited for the hold time, like a blocking one's (see _unresolved).
            pend.event.nonblocking = bool(f.flags & R.SOCK_F_NONBLOCK)
            return []
        if pend is None or pend.resolved or f.oldstate != TCP_SYN_SENT:
            return []
        del self._pending[f.cookie]
        ev = pend.event
        if f.newstate == TCP_ESTABLISHED:
            ev.outcome = "success"
            ev.saddr = fmt_addr(f.family, f.saddr)
            ev.sport = f.sport
            return self._await_flow(ev, f.cookie, f.ktime_ns)
        if f.err:
            ev.outcome = "error"
            ev.errno = f.err
            ev.errno_name = errno_name(f.err)
        else:
            # Closed by its owner before the handshake ended: no outcome to report.
            _unresolved(ev)
        return [ev]

    def _bind(self, f: R.BindRecord) -> BindEvent:
        failed = bool(f.flags & R.BIND_F_FAILED)
        known = bool(f.flags & R.BIND_F_REQUEST_KNOWN)
        return BindEvent(
            *self._common(f),
            protocol=protocol_name(f.sock_type, f.protocol),
            family=family_name(f.family),
            addr="" if failed else fmt_addr(f.family, f.addr),
            port=0 if failed else f.port,
            requested_addr=fmt_addr(f.family, f.req_addr) if known else "",
            requested_port=f.req_port if known else 0,
            outcome="error" if failed else "success",
        )

    # -- time -------------------------------------------------------------------------------

    def _flush_pending(self, pid: int | None = None, now_ns: int | None = None) -> list[AnyEvent]:
        out: list[AnyEvent] = []
        if not self._pending:
            return out
        for cookie, pend in list(self._pending.items()):
            if (pid is not None and pend.event.process.pid == pid) or (
                now_ns is not None and pend.deadline_ns <= now_ns
            ):
                del self._pending[cookie]
                out.append(pend.event if pend.resolved else _unresolved(pend.event))
        return out

    def _flush_lineage(self, pid: int) -> list[AnyEvent]:
        """The connects held for their flow's first bytes (or outcome) of `pid` and of its
        ancestors, out now, for an exec of `pid`: they were made before it, and rules that
        follow a connect with what runs next (a shell after a connect, in the process or a
        descendant: a reverse shell whose shell comes on a pty) must see them first. Such a
        connect goes without what its flow speaks when no byte came before the exec."""
        lineage = {pid, *(a.pid for a in self.procs.ancestry(pid))}
        out: list[AnyEvent] = []
        for cookie, pend in list(self._pending.items()):
            if pend.event.process.pid in lineage:
                del self._pending[cookie]
                out.append(pend.event if pend.resolved else _unresolved(pend.event))
        return out

    def expire(self, now_mono_ns: int | None = None) -> list[AnyEvent]:
        """Connects whose outcome did not come within the hold time, shown as pending."""
        return self._flush_pending(
            now_ns=time.monotonic_ns() if now_mono_ns is None else now_mono_ns
        )

    def flush_all(self) -> list[AnyEvent]:
        return self._flush_pending(now_ns=1 << 62)
