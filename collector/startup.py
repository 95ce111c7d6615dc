"""What traced processes already had when tracing started, read once from /proc and the
kernel's socket tables, so that a listener opened before sandtrace is not invisible."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from api.events import SocketEvent
from collector import records as R
from collector.assemble import Assembler
from collector.proctable import read_proc
from collector.sockets import SocketSnapshotError, snapshot

log = structlog.get_logger("sandtrace.startup")


def _status_ids(status: str) -> tuple[int, int, int]:
    """(uid, gid, pid in its own namespace) from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uid = int(fields["Uid"].split()[0])
    gid = int(fields["Gid"].split()[0])
    ns_pid = int(fields.get("NSpid", fields["Pid"]).split()[-1])
    return uid, gid, ns_pid


def proc_header(pid: int, sandbox: int, cgroup_root: Path) -> R.Header | None:
    """The record header the probes would have written for `pid` now; None if it is gone."""
    base = Path("/proc") / str(pid)
    info = read_proc(pid)
    if info is None:
        return None
    try:
        uid, gid, ns_pid = _status_ids((base / "status").read_text())
        comm = (base / "comm").read_bytes().rstrip(b"\n")
        cgroup = next(
            ln[3:] for ln in (base / "cgroup").read_text().splitlines() if ln.startswith("0::")
        )
        cgroup_id = (cgroup_root / cgroup.lstrip("/")).stat().st_ino
    except (OSError, StopIteration, KeyError, ValueError):
        return None
    return R.Header(
        type=0,
        version=R.LAYOUT_VERSION,
        size=0,
        ktime_ns=time.monotonic_ns(),
        cgroup_id=cgroup_id,
        start_ns=info.start_ns,
        pid=pid,
        tid=pid,
        ns_pid=ns_pid,
        ppid=info.ppid,
        uid=uid,
        gid=gid,
        sandbox=sandbox,
        comm=comm[:15],
    )


def held_socket_events(
    assembler: Assembler, pids_by_scope: Mapping[int, set[int]], cgroup_root: Path
) -> list[SocketEvent]:
    """One event per socket (TCP or UDP, IPv4 or IPv6) a traced process holds now."""
    scope_of = {pid: scope for scope, pids in pids_by_scope.items() for pid in pids}
    if not scope_of:
        return []
    try:
        held = snapshot(set(scope_of))
    except SocketSnapshotError as exc:
        log.warning(
            "socket snapshot failed; sockets held before start are not reported", error=str(exc)
        )
        return []
    events = []
    for sock in held:
        header = proc_header(sock.pid, scope_of[sock.pid], cgroup_root)
        if header is not None:
            events.append(assembler.held_socket(header, sock))
    return events
