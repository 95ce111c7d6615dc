"""The collector's process table: who is who, for enriching events with ancestry and names.

Fed from fork/exec/exit records (and from /proc for processes that existed before tracing
started). A process is keyed by "<pid>@<start_ns>" so that a reused pid never inherits the
history of the process that had it before.

Start times read from /proc are only as precise as a clock tick (10 ms at USER_HZ=100),
while the kernel records give nanoseconds. An entry seeded from /proc is therefore taken
to be the same process as a kernel record whose start time lies within one tick of it,
and it then takes the precise start time (and key) from that record.
"""

from __future__ import annotations

import grp
import os
import pwd
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import structlog

from api.events import AncestorRef
from collector.records import split_nul

_log = structlog.get_logger()

NS_PER_SEC = 1_000_000_000


def process_key(pid: int, start_ns: int) -> str:
    """The unique key of a process: "<pid>@<start_ns>"."""
    return f"{pid}@{start_ns}"


@dataclass(frozen=True, slots=True)
class ExecIdentity:
    """What a process's program is, from its completed exec event: carried by the events of
    the process that follow (collector.enrich)."""

    sha256: str
    original_exe: bytes
    go_module: str
    cwd: bytes
    filename: bytes


@dataclass(slots=True)
class ProcInfo:
    pid: int
    key: str  # "<pid>@<start_ns>"
    ppid: int
    exe: bytes
    argv: list[bytes]
    start_ns: int
    exited: bool = False
    ident: ExecIdentity | None = None  # its program's, once its exec was completed


def _clock_tick_ns() -> int:
    return NS_PER_SEC // os.sysconf("SC_CLK_TCK")


class ProcessTable:
    """Processes by pid, bounded.

    At most `max_entries` processes are held; of those that have exited, the
    `exited_keep` that exited last are kept so that events arriving late still resolve.
    When the table is full, the oldest exited entry goes first, then the least recently
    added live one. Not thread-safe: feed it from one thread.
    """

    def __init__(self, max_entries: int = 65536, exited_keep: int = 4096) -> None:
        if max_entries < 1 or exited_keep < 0:
            raise ValueError("max_entries must be >= 1 and exited_keep >= 0")
        self.max_entries = max_entries
        self.exited_keep = exited_keep
        self._procs: dict[int, ProcInfo] = {}  # insertion order = age
        self._exited: OrderedDict[int, None] = OrderedDict()  # exit order
        self._coarse: set[int] = set()  # pids whose start_ns came from /proc
        self._tick_ns = _clock_tick_ns()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._procs)

    def get(self, pid: int) -> ProcInfo | None:
        return self._procs.get(pid)

    # --- feeding ---------------------------------------------------------------------

    def _same_process(self, info: ProcInfo, start_ns: int) -> bool:
        if info.start_ns == start_ns:
            return True
        return info.pid in self._coarse and abs(start_ns - info.start_ns) < self._tick_ns

    def _insert(self, info: ProcInfo) -> None:
        pid = info.pid
        self._procs.pop(pid, None)
        self._exited.pop(pid, None)
        self._coarse.discard(pid)
        self._procs[pid] = info
        self._trim()

    def _drop(self, pid: int) -> None:
        del self._procs[pid]
        self._exited.pop(pid, None)
        self._coarse.discard(pid)
        self.evicted += 1

    def _trim(self) -> None:
        while len(self._exited) > self.exited_keep:
            self._drop(next(iter(self._exited)))
        while len(self._procs) > self.max_entries:
            if self._exited:
                self._drop(next(iter(self._exited)))
            else:
                self._drop(next(iter(self._procs)))

    def _refine_start(self, info: ProcInfo, start_ns: int) -> None:
        """Take the precise start time of a kernel record for an entry seeded from /proc."""
        if info.start_ns != start_ns:
            info.start_ns = start_ns
            info.key = process_key(info.pid, start_ns)
        self._coarse.discard(info.pid)

    def on_exec(
        self, pid: int, start_ns: int, ppid: int, exe: bytes, argv: list[bytes]
    ) -> ProcInfo:
        """Process `pid` ran a new program. A new start time means a new process."""
        info = self._procs.get(pid)
        if info is not None and self._same_process(info, start_ns):
            self._refine_start(info, start_ns)
            info.ppid = ppid
            info.exe = exe
            info.argv = list(argv)
            info.ident = None  # a new program, known once its exec is completed
            return info
        info = ProcInfo(
            pid=pid,
            key=process_key(pid, start_ns),
            ppid=ppid,
            exe=exe,
            argv=list(argv),
            start_ns=start_ns,
        )
        self._insert(info)
        return info

    def on_fork(self, parent_pid: int, child_pid: int, child_start_ns: int) -> ProcInfo:
        """Process `parent_pid` made a new process (not a thread) `child_pid`.

        The child runs its parent's program, so it inherits exe and argv until it execs.
        """
        existing = self._procs.get(child_pid)
        if existing is not None and self._same_process(existing, child_start_ns):
            self._refine_start(existing, child_start_ns)
            existing.ppid = parent_pid
            return existing  # already known (e.g. its exec record came first)
        parent = self._procs.get(parent_pid)
        info = ProcInfo(
            pid=child_pid,
            key=process_key(child_pid, child_start_ns),
            ppid=parent_pid,
            exe=parent.exe if parent is not None else b"",
            argv=list(parent.argv) if parent is not None else [],
            start_ns=child_start_ns,
            ident=parent.ident if parent is not None else None,
        )
        self._insert(info)
        return info

    def on_exit(self, pid: int) -> None:
        """Process `pid` exited; it stays resolvable until `exited_keep` newer exits."""
        info = self._procs.get(pid)
        if info is None or info.exited:
            return
        info.exited = True
        self._exited[pid] = None
        self._trim()

    # --- reading ---------------------------------------------------------------------

    def live_pids(self) -> list[int]:
        """The pids of the processes the table holds that have not exited (in no order):
        every entry but those of `_exited`, which holds exactly the exited ones (a set
        difference in C, not a look at each of the thousands of entries)."""
        return list(self._procs.keys() - self._exited.keys())

    def ancestry(self, pid: int, limit: int = 32) -> list[AncestorRef]:
        """Ancestors of `pid`, parent first, as far as the table knows them.

        Stops at a pid the table does not hold, at pid 0 or 1 (not included), on a cycle,
        after `limit` entries, and at an entry that started after its supposed child (the
        parent's pid was reused by a newer process).
        """
        info = self._procs.get(pid)
        chain: list[AncestorRef] = []
        if info is None:
            return chain
        seen = {pid}
        child = info
        while len(chain) < limit:
            ppid = child.ppid
            if ppid in (0, 1) or ppid in seen:
                break
            parent = self._procs.get(ppid)
            if parent is None or parent.start_ns > child.start_ns + self._tick_ns:
                break
            chain.append(
                AncestorRef(pid=parent.pid, key=parent.key, exe=parent.exe, argv=list(parent.argv))
            )
            seen.add(ppid)
            child = parent
        return chain

    # --- /proc -----------------------------------------------------------------------

    def seed_from_proc(self, pid: int, proc_root: Path = Path("/proc")) -> ProcInfo | None:
        """Add (or refresh) process `pid` from /proc; None when it no longer exists.

        An entry already in the table for the same process (same start time within a
        clock tick) is kept with its precise start time; its exe and argv are refreshed.
        """
        read = read_proc(pid, proc_root, self._tick_ns)
        if read is None:
            return None
        existing = self._procs.get(pid)
        if existing is not None and (
            existing.start_ns == read.start_ns
            or abs(existing.start_ns - read.start_ns) < self._tick_ns
        ):
            existing.ppid = read.ppid
            existing.exe = read.exe
            existing.argv = read.argv
            if read.exited and not existing.exited:
                self.on_exit(pid)
            return existing
        self._insert(read)
        self._coarse.add(pid)
        if read.exited:
            read.exited = False
            self.on_exit(pid)
        return read


def parse_stat(stat: bytes) -> tuple[bytes, int, int]:
    """(state, ppid, start time in clock ticks) from the text of /proc/PID/stat.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields are read after the last ")".
    """
    close = stat.rfind(b")")
    if close < 0:
        raise ValueError("no ')' in /proc/PID/stat")
    rest = stat[close + 1 :].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    if len(rest) < 20:
        raise ValueError("too few fields in /proc/PID/stat")
    return rest[0], int(rest[1]), int(rest[19])


def descendants(pid: int, proc_root: Path = Path("/proc")) -> set[int]:
    """pid and every live descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            _, ppid, _ = parse_stat((entry / "stat").read_bytes())
        except (OSError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def read_proc(pid: int, proc_root: Path = Path("/proc"), tick_ns: int = 0) -> ProcInfo | None:
    """Read one process from `proc_root`; None when it is gone (or its pid was reused
    while reading). `tick_ns` is the length of a clock tick, from the system when 0."""
    if tick_ns <= 0:
        tick_ns = _clock_tick_ns()
    base = proc_root / str(pid)
    try:
        state, ppid, ticks = parse_stat((base / "stat").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return None
    except ValueError:
        _log.warning("unparsable /proc stat", pid=pid)
        return None
    try:
        exe = os.fsencode((base / "exe").readlink())
    except OSError:  # kernel thread, zombie, or gone
        exe = b""
    try:
        argv = split_nul((base / "cmdline").read_bytes())
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        _, _, ticks_after = parse_stat((base / "stat").read_bytes())
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    if ticks_after != ticks:
        return None  # the pid now belongs to another process
    start_ns = ticks * tick_ns
    return ProcInfo(
        pid=pid,
        key=process_key(pid, start_ns),
        ppid=ppid,
        exe=exe,
        argv=argv,
        start_ns=start_ns,
        exited=state in (b"Z", b"X"),
    )


class Names:
    """uid -> user name and gid -> group name as this host knows them ("" when unknown).

    Results (also misses) are cached; each cache holds at most `max_entries`.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._max_entries = max(1, max_entries)
        self._users: OrderedDict[int, str] = OrderedDict()
        self._groups: OrderedDict[int, str] = OrderedDict()

    def _remember(self, cache: OrderedDict[int, str], key: int, value: str) -> str:
        cache[key] = value
        while len(cache) > self._max_entries:
            cache.popitem(last=False)
        return value

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is not None:
            self._users.move_to_end(uid)
            return name
        try:
            name = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            name = ""
        return self._remember(self._users, uid, name)

    def group(self, gid: int) -> str:
        name = self._groups.get(gid)
        if name is not None:
            self._groups.move_to_end(gid)
            return name
        try:
            name = grp.getgrgid(gid).gr_name
        except (KeyError, OverflowError):
            name = ""
        return self._remember(self._groups, gid, name)
