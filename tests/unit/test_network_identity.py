"""Network events carry what the process runs, as its completed exec event said: identity
(Hashes, OriginalFileName), working directory and execve name, taken from the process table
(no lookup of their own), for events of the same batch as the exec and of later ones, and
for the children the process forks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from api.events import Alert, AnyEvent, ConnectEvent, ExecEvent, ForkEvent
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
