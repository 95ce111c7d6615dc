"""Completes exec events with what only this host can see: the executed file's identity
(collector/identity.py) and the standard streams (collector/stdio.py).

A batch is completed in two halves so that events keep their order and rules see every
field on the exec event itself. `begin` runs on the event loop: for each exec, one stat of
/proc/PID/exe (and three readlinks of /proc/PID/fd where the kernel did not capture the
streams at exec); known files are filled in at once, new files are opened.
If anything is left (files to read, sockets to look up), the pipeline awaits `Batch.work`
in the worker thread and then `Batch.apply` before it hands the batch on; other batches wait
behind it, so a process's later events never overtake its exec.

Then `carry` gives what each completed exec says to the events of its process that follow
(Process.sha256, original_exe, go_module, cwd, filename), so that a connect or bind is judged
by identity too: through the process table for later batches, and to the events of the
same batch, assembled before the exec was completed, directly. No new lookups: only what the
exec event already holds.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field

import msgspec
import structlog

from api.events import AnyEvent, Event, ExecEvent, ForkEvent, Process
from collector.identity import FileKey, Identities, Identity, PendingFile
from collector.proctable import ExecIdentity
from collector.stdio import UNKNOWN, PendingSocket, StdioReader

log = structlog.get_logger("sandtrace.collector")


@dataclass(slots=True)
class _Open:
    """An exec whose fields wait for the worker."""

    index: int
    event: ExecEvent
    identity: Identity | PendingFile | None
    stdio: list[str]
    sockets: list[PendingSocket]


@dataclass(slots=True)
class Batch:
    enricher: ExecEnricher
    events: list[AnyEvent]
    files: dict[FileKey, PendingFile] = field(default_factory=dict)
    open: list[_Open] = field(default_factory=list)

    def work(self) -> None:
        """The slow half, in the worker thread: read new files, look up sockets. Whatever
        fails is logged and left unanswered; the events go on without it."""
        for item in self.files.values():
            try:
                self.enricher.identities.resolve(item)
            except Exception:  # a bug here must not stop the events
                log.exception("reading an executed file failed", key=item.key)
        memo: dict[tuple[int, int], str] = {}
        for o in self.open:
            if o.sockets:
                pid = o.event.process.pid
                try:
                    self.enricher.stdio.resolve_sockets(pid, o.stdio, o.sockets, memo)
                except Exception:
                    log.exception("looking up a standard stream's socket failed", pid=pid)
                for s in o.sockets:
                    o.stdio[s.fd] = o.stdio[s.fd] or "socket"

    def apply(self) -> None:
        """Back on the event loop: cache what was read and complete the waiting events."""
        settled = {key: self.enricher.identities.settle(f) for key, f in self.files.items()}
        for o in self.open:
            ident = o.identity
            if isinstance(ident, PendingFile):
                ident = settled[ident.key]
            self.enricher.stdio.remember(o.stdio, o.sockets)
            self.events[o.index] = _complete(o.event, ident, o.stdio)


def _complete(ev: ExecEvent, ident: Identity | None, stdio: list[str]) -> ExecEvent:
    if ident is None:
        return ev if stdio is ev.stdio else msgspec.structs.replace(ev, stdio=stdio)
    return msgspec.structs.replace(
        ev,
        sha256=ident.sha256,
        original_exe=ident.original_exe,
        go_module=ident.go_module,
        stdio=stdio,
    )


class ExecEnricher:
    def __init__(self, identities: Identities, stdio: StdioReader) -> None:
        self.identities = identities
        self.stdio = stdio
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sandtrace-identity"
        )
        self._first_exec = -1  # index of the first exec of the batch begun, -1 for none

    def known_at_exec(self, file_key: FileKey) -> Identity | None:
        """The identity of a file the cache holds under the kernel's key, for an exec whose
        standard streams the kernel captured (Assembler.known_file): such an exec is
        complete as the assembler builds it, and skips begin(). Counted as begin() counts
        it: an identity cache hit, streams captured at exec."""
        known = self.identities.cached(file_key)
        if known is not None:
            self.stdio.stats.captured += 1
        return known

    def begin(
        self,
        events: list[AnyEvent],
        file_keys: Mapping[int, FileKey] | None = None,
        complete: Container[int] = (),
    ) -> Batch | None:
        """Complete the exec events of `events` in place where the answers are at hand;
        the rest, if any, as a Batch to finish with `work` (thread) and `apply` (loop).
        `file_keys`: id() of an exec event -> its file's version as the kernel read it at
        exec (Assembler.exec_file_keys); a file cached under it costs no system call.
        `complete`: id() of the exec events that are complete already
        (Assembler.exec_complete, from known_at_exec)."""
        batch: Batch | None = None
        files: dict[FileKey, PendingFile] = {}  # new files, each opened once per batch
        self._first_exec = -1
        for i, ev in enumerate(events):
            if type(ev) is not ExecEvent or id(ev) in complete:
                continue
            if self._first_exec < 0:
                self._first_exec = i
            pid = ev.process.pid
            # /proc is read for the streams only where the kernel did not capture them: it
            # must then be told whether the process still runs this file, which needs the
            # stat.
            file_key = file_keys.get(id(ev)) if file_keys and ev.stdio else None
            ident, live = self.identities.find(
                pid, ev.exe_inode, ev.process.exe, files, file_key=file_key
            )
            sockets: list[PendingSocket] = []
            if ev.stdio:  # captured in the kernel at exec (collector/stdio.py)
                self.stdio.stats.captured += 1
                stdio = ev.stdio
            elif live:
                stdio, sockets = self.stdio.read(pid)
            else:
                self.stdio.stats.unknown += 1
                stdio = list(UNKNOWN)
            if isinstance(ident, PendingFile) or sockets:
                if batch is None:
                    batch = Batch(self, events, files)
                if isinstance(ident, PendingFile):
                    ident.waiting.append(i)
                batch.open.append(_Open(i, ev, ident, stdio, sockets))
            else:
                events[i] = _complete(ev, ident, stdio)
        return batch

    def carry(
        self, events: list[AnyEvent], identify: Callable[[int, str, ExecIdentity], None]
    ) -> None:
        """Once the execs of the batch begun are complete: what each says its process runs
        goes to `identify` (the process table: Assembler.identify, for later batches), and to
        the events of this batch that follow it, of the process and of the children it forks
        (their Process is replaced by a copy with the identity, one copy per Process object:
        the events of one process share theirs)."""
        start, self._first_exec = self._first_exec, -1
        if start < 0:
            return
        current: dict[str, ExecIdentity] = {}  # process key -> what it runs now
        copies: dict[int, tuple[Process, Process]] = {}  # id(process) -> (it, its copy)
        for i in range(start, len(events)):
            ev = events[i]
            if not isinstance(ev, Event):  # no process (a loss report)
                continue
            process = ev.process
            if type(ev) is ExecEvent:
                ident = ExecIdentity(ev.sha256, ev.original_exe, ev.go_module, ev.cwd, ev.filename)
                identify(process.pid, process.key, ident)
                current[process.key] = ident
            else:
                found = current.get(process.key)
                if found is None:
                    continue
                ident = found
                if type(ev) is ForkEvent:  # forked before the parent's exec was complete
                    identify(ev.child_pid, ev.child_key, ident)
                    current[ev.child_key] = ident
            pair = copies.get(id(process))
            if pair is None:
                copy = msgspec.structs.replace(
                    process,
                    sha256=ident.sha256,
                    original_exe=ident.original_exe,
                    go_module=ident.go_module,
                    cwd=ident.cwd,
                    filename=ident.filename,
                )
                copies[id(process)] = pair = (process, copy)
            ev.process = pair[1]

    def counters(self) -> dict[str, int]:
        ident = self.identities.stats.as_dict()
        stdio = self.stdio.stats.as_dict()
        return {
            **{f"identity_{k}": v for k, v in ident.items()},
            **{f"stdio_{k}": v for k, v in stdio.items()},
        }

    def close(self) -> None:
        self.pool.shutdown(wait=True)
