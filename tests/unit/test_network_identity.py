"""Network events carry what the process runs, as its completed exec event said: identity
(Hashes, OriginalFileName), working directory and execve name, taken from the process table
(no lookup of their own), for events of the same batch as the exec and of later ones, and
for the children the process forks."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from api.events import Alert, AnyEvent, ConnectEvent, ExecEvent, ExitEvent, ForkEvent
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.enrich import ExecEnricher
from collector.identity import Identities
from collector.packages import PackageIndex
from collector.pipeline import CallbackSink, Pipeline
from collector.stdio import StdioReader
from detect.fields import fields_of
from tests.unit.test_assemble import ip4, pack
from tests.unit.test_identity import _Source, exec_record, sha256_of, sleeper, wait_exec
from tests.unit.test_stdio import CHR, dev, fd_of

__all__ = ["sleeper"]  # the fixture, used by name

START = 5_000  # the start time pack() gives every record's process


def udp_connect(pid: int, port: int, **kw: Any) -> bytes:
    return pack(
        R.REC_CONNECT,
        pid=pid,
        tid=pid,
        family=2,
        sock_type=2,
        protocol=17,
        daddr=ip4("192.0.2.7"),
        dport=port,
        **kw,
    )


def run(batches: list[list[bytes]], packages: PackageIndex | None) -> list[AnyEvent | Alert]:
    seen: list[AnyEvent | Alert] = []
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    enricher = ExecEnricher(Identities(packages), StdioReader())
    pipeline = Pipeline(_Source(batches), asm, [CallbackSink(seen.append)], enricher=enricher)
    stop = asyncio.Event()
    stop.set()
    asyncio.run(pipeline.run(stop))
    return seen


def test_connects_after_an_exec_carry_its_identity(
    sleeper: tuple[Any, Path],
) -> None:
    proc, copy = sleeper
    wait_exec(proc.pid, copy.stat().st_ino)
    pid, child = proc.pid, proc.pid + 10_000_000
    first = [
        udp_connect(pid, 1),  # before the exec: the program it ran then is not known
        exec_record(pid, copy),
        udp_connect(pid, 2),  # same batch as the exec, assembled before it was completed
        pack(R.REC_FORK, pid=pid, tid=pid, child_pid=child, child_start_ns=START + 1),
        udp_connect(child, 3, start_ns=START + 1, ppid=pid),  # its child, same batch
    ]
    later = [udp_connect(pid, 4), udp_connect(child, 5, start_ns=START + 1, ppid=pid)]
    seen = run([first, later], PackageIndex())
    connects = {e.dport: e for e in seen if isinstance(e, ConnectEvent)}
    assert sorted(connects) == [1, 2, 3, 4, 5]
    [exec_event] = [e for e in seen if isinstance(e, ExecEvent)]
    digest = sha256_of(copy)
    assert exec_event.sha256 == digest and exec_event.original_exe == b"/usr/bin/sleep"
    assert connects[1].process.sha256 == ""
    for port in (2, 3, 4, 5):
        p = connects[port].process
        assert (p.sha256, p.original_exe, p.filename) == (
            digest,
            b"/usr/bin/sleep",
            exec_event.filename,
        ), port
        assert p.cwd == exec_event.cwd, port
    # the exec event's own process says it as well, and nothing else changed
    assert exec_event.process.sha256 == digest
    assert exec_event.process.pid == pid and connects[3].process.pid == child
    [fork] = [e for e in seen if isinstance(e, ForkEvent)]
    assert fork.process.original_exe == b"/usr/bin/sleep"
    # as rules read them: a renamed program is named by what it is on its connects
    view = fields_of(connects[4])
    assert view is not None
    assert view["Image"] == str(copy)
    assert view["OriginalFileName"] == "/usr/bin/sleep"
    assert view["Hashes"] == f"SHA256={digest}"


def test_a_new_program_drops_the_old_identity(sleeper: tuple[Any, Path]) -> None:
    proc, copy = sleeper
    wait_exec(proc.pid, copy.stat().st_ino)
    pid = proc.pid
    gone = Path("/nonexistent/program")  # exec'd once the first ran: no file to read
    records = [
        exec_record(pid, copy),
        udp_connect(pid, 1),
        pack(R.REC_EXEC, b"x\0" + b"program\0nonexistent\0", pid=pid, tid=pid, argv_size=2,
             argv_full_size=2, exe_size=20, exe_ino=1),
        udp_connect(pid, 2),
    ]  # fmt: skip
    seen = run([records, [udp_connect(pid, 3)]], None)
    connects = {e.dport: e for e in seen if isinstance(e, ConnectEvent)}
    assert connects[1].process.sha256 == sha256_of(copy)
    assert connects[2].process.exe == str(gone).encode()
    for port in (2, 3):
        assert connects[port].process.sha256 == "", port
        assert connects[port].process.original_exe == b"", port


# -- execs complete as assembled: a file the cache knows by the kernel's key ---------------


def keyed_exec(pid: int, exe: Path, **kw: Any) -> bytes:
    """An exec record as the probe writes it for a file it could key (device, change time,
    size) and streams it captured (three /dev/null): nothing for the enricher to look up
    once the identity cache holds the file."""
    st = exe.stat()
    null = fd_of(CHR, rdev=dev(1, 3))
    stdio = b"".join(R.layout(R.StdioFd).struct.pack(*fd) for fd, _ in [null] * 3)
    return exec_record(
        pid,
        exe,
        exe_dev=dev(os.major(st.st_dev), os.minor(st.st_dev)),
        exe_ctime_ns=st.st_ctime_ns,
        exe_file_size=st.st_size,
        flags=R.EXEC_F_FILE_KEY | R.EXEC_F_STDIO,
        stdio=stdio.ljust(R.STDIO_FDS * 48, b"\0"),
        **kw,
    )


def test_an_exec_of_a_known_file_is_complete_as_assembled(tmp_path: Path) -> None:
    """Once a file is hashed, the next exec of it (by the kernel's key, streams captured)
    is complete when assembled: the enricher skips it, and the process carries the identity
    from that exec on, on its own later events and its children's, with no copy made."""
    tool = tmp_path / "tool"
    shutil.copy2("/usr/bin/true", tool)
    digest = sha256_of(tool)
    first, second, child = 4_000_101, 4_000_102, 4_000_103  # gone: found by the path
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    enricher = ExecEnricher(Identities(None), StdioReader())
    seen: list[AnyEvent | Alert] = []
    batches = [
        [keyed_exec(first, tool, start_ns=START)],  # new: hashed by the enricher's worker
        [
            keyed_exec(second, tool, start_ns=START),
            pack(R.REC_FORK, pid=second, tid=second, child_pid=child, child_start_ns=START + 1),
            udp_connect(child, 7, start_ns=START + 1, ppid=second),
            pack(R.REC_EXIT, pid=second, tid=second, start_ns=START),
        ],
    ]
    source = _Source(batches[:1])
    pipeline = Pipeline(source, asm, [CallbackSink(seen.append)], enricher=enricher)
    try:
        asyncio.run(pipeline._process_batches())
        assert asm.exec_complete == set()  # a miss goes through the enricher
        source.queue.batches = batches[1:]
        asyncio.run(pipeline._process_batches())
    finally:
        enricher.close()
    execs = [e for e in seen if isinstance(e, ExecEvent)]
    assert [e.process.pid for e in execs] == [first, second]
    assert asm.exec_complete == {id(execs[1])}
    for e in execs:
        assert (e.sha256, e.stdio, e.process.sha256) == (digest, ["null"] * 3, digest)
    [fork] = [e for e in seen if isinstance(e, ForkEvent)]
    [exit_event] = [e for e in seen if isinstance(e, ExitEvent)]
    [connect] = [e for e in seen if isinstance(e, ConnectEvent)]
    assert fork.process is execs[1].process is exit_event.process  # one context, no copy
    assert (connect.process.pid, connect.process.sha256) == (child, digest)
    assert connect.process.filename == execs[1].filename
    ident, stdio = enricher.identities.stats, enricher.stdio.stats
    assert (ident.misses, ident.hits, stdio.captured) == (1, 1, 2)


def test_a_known_exec_after_an_unknown_one_keeps_its_own_identity(tmp_path: Path) -> None:
    """In one batch, a process runs a file new to the cache (completed later, carried onto
    what follows) and forks a child that runs a known one (complete as assembled): the
    child's events carry its own program's identity, not its parent's."""
    known, new = tmp_path / "known", tmp_path / "new"
    shutil.copy2("/usr/bin/true", known)
    shutil.copy2("/usr/bin/sleep", new)
    parent, child = 4_000_201, 4_000_202
    asm = Assembler([Scope("box", ["/"])], lambda _id: "/", lambda _p: "", host="h")
    enricher = ExecEnricher(Identities(None), StdioReader())
    seen: list[AnyEvent | Alert] = []
    batch = [
        keyed_exec(parent, new, start_ns=START),
        pack(R.REC_FORK, pid=parent, tid=parent, child_pid=child, child_start_ns=START + 1),
        keyed_exec(child, known, start_ns=START + 1, ppid=parent),
        udp_connect(child, 8, start_ns=START + 1, ppid=parent),
        pack(R.REC_EXIT, pid=child, tid=child, start_ns=START + 1, ppid=parent),
        udp_connect(parent, 9, start_ns=START),
    ]
    source = _Source([[keyed_exec(4_000_200, known, start_ns=START)]])  # the cache learns it
    pipeline = Pipeline(source, asm, [CallbackSink(seen.append)], enricher=enricher)
    try:
        asyncio.run(pipeline._process_batches())
        source.queue.batches = [batch]
        seen.clear()
        asyncio.run(pipeline._process_batches())
    finally:
        enricher.close()
    digest_known, digest_new = sha256_of(known), sha256_of(new)
    by_port = {e.dport: e for e in seen if isinstance(e, ConnectEvent)}
    [exit_event] = [e for e in seen if isinstance(e, ExitEvent)]
    [fork] = [e for e in seen if isinstance(e, ForkEvent)]
    assert by_port[8].process.sha256 == digest_known
    assert exit_event.process.sha256 == digest_known
    assert by_port[9].process.sha256 == digest_new
    assert fork.process.sha256 == digest_new
    execs = {e.process.pid: e for e in seen if isinstance(e, ExecEvent)}
    assert (execs[parent].sha256, execs[child].sha256) == (digest_new, digest_known)
    assert asm.exec_complete == {id(execs[child])}
