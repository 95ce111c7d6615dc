"""Packet (AF_PACKET) sockets held by sandboxed processes, polled from /proc where the kernel
cannot show them being made (no kprobes: probes/kernel.py says so at startup).

Once a second, each network namespace the sandboxes' live processes are in lists its packet
sockets in /proc/PID/net/packet (a few lines; none on most hosts). A socket not seen before
is looked for among the descriptors of the sandboxed processes in that namespace, and each
holder found makes it a raw-socket event (family packet, its ethertype), as the kprobe's
record would have. A socket made and closed between two polls is missed, and the event's
time is the poll's, not socket()'s: a fallback for a sniffer that keeps its socket, not a
substitute for the kprobe.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from api.events import AnyEvent
from collector import records as R
from collector.assemble import AF_PACKET, Assembler
from collector.startup import proc_header

log = structlog.get_logger("sandtrace.collector")

POLL_SECONDS = 1.0
SEEN_MAX = 65536  # sockets remembered (netns, inode); forgotten all at once beyond it


def parse_net_packet(text: str) -> dict[int, tuple[int, int]]:
    """Socket inode -> (socket type, ethertype) from the text of /proc/PID/net/packet
    ("sk RefCnt Type Proto Iface R Rmem User Inode", Proto in hex, host order)."""
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 9:
            continue
        try:
            out[int(fields[8])] = (int(fields[2]), int(fields[3], 16))
        except ValueError:
            continue
    return out


class PacketSocketPoller:
    """Call `poll` from the event loop as often as it likes: it looks at most once every
    `interval` seconds and returns the events of packet sockets new since the last look."""

    def __init__(
        self,
        assembler: Assembler,
        cgroup_root: Path,
        *,
        interval: float = POLL_SECONDS,
        proc: Path = Path("/proc"),
    ) -> None:
        self.assembler = assembler
        self.cgroup_root = cgroup_root
        self.interval = interval
        self.proc = proc
        self._next = 0.0
        self._seen: set[tuple[int, int]] = set()
        self.polls = 0

    def poll(self) -> list[AnyEvent]:
        now = time.monotonic()
        if now < self._next:
            return []
        self._next = now + self.interval
        self.polls += 1
        try:
            return self._look(self.assembler.procs.live_pids())
        except Exception:  # a bug here must not stop the events
            log.exception("looking for packet sockets failed")
            return []

    def _netns(self, pid: int) -> int | None:
        try:
            return os.stat(f"{self.proc}/{pid}/ns/net").st_ino  # noqa: PTH116 - per pid, each second
        except OSError:
            return None

    def _look(self, pids: Iterable[int]) -> list[AnyEvent]:
        by_netns: dict[int, list[int]] = {}
        for pid in pids:
            ns = self._netns(pid)
            if ns is not None:
                by_netns.setdefault(ns, []).append(pid)
        events: list[AnyEvent] = []
        for ns, members in by_netns.items():
            try:
                table = parse_net_packet(
                    (self.proc / str(members[0]) / "net" / "packet").read_text()
                )
            except OSError:
                continue
            new = {ino: kind for ino, kind in table.items() if (ns, ino) not in self._seen}
            if not new:
                continue
            if len(self._seen) + len(new) > SEEN_MAX:
                self._seen.clear()
            self._seen.update((ns, ino) for ino in new)
            for pid, ino in self._holders(members, new):
                events.extend(self._event(pid, *new[ino]))
        return events

    def _holders(self, pids: list[int], inodes: Iterable[int]) -> list[tuple[int, int]]:
        """(pid, socket inode) for each of `pids` holding one of `inodes`."""
        wanted = {f"socket:[{ino}]": ino for ino in inodes}
        found = []
        for pid in pids:
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)  # noqa: PTH208 - names only, no Path per fd
            except OSError:
                continue
            held = set()
            for fd in fds:
                try:
                    ino = wanted.get(os.readlink(f"{fd_dir}/{fd}"))  # noqa: PTH115 - per fd
                except OSError:
                    continue
                if ino is not None and ino not in held:
                    held.add(ino)
                    found.append((pid, ino))
        return found

    def _scope_of(self, pid: int) -> int | None:
        """The index of the scope whose cgroups hold `pid`, None if none does (or it is gone)."""
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return None
        path = next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), None)
        if path is None:
            return None
        for index, scope in enumerate(self.assembler.scopes):
            for root in scope.cgroup_paths:
                if root in ("/", path) or path.startswith(root.rstrip("/") + "/"):
                    return index
        return None

    def _event(self, pid: int, sock_type: int, ethertype: int) -> list[AnyEvent]:
        sandbox = self._scope_of(pid)
        if sandbox is None:
            return []
        header = proc_header(pid, sandbox, self.cgroup_root)
        if header is None:
            return []
        record = R.SockCreateRecord(
            *header._replace(type=R.REC_SOCK_CREATE),
            cookie=0,
            family=AF_PACKET,
            sock_type=sock_type,
            protocol=ethertype,
        )
        return self.assembler.feed(record)
