"""Scope decided in the kernel: host processes cost no events, descendants and escapees stay
traced, and the move out of the sandbox is itself an event."""

from __future__ import annotations

import socket
import subprocess

from api.events import ExecEvent, LostEvent
from collector import cgroups
from tests.kernel.tracer import PYTHON, Tracer, of, one

CALLS = """
import socket, subprocess, sys
s = socket.socket(); s.connect(("127.0.0.1", int(sys.argv[1]))); s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
u.connect(("127.0.0.1", 9)); u.close()
subprocess.run(["/usr/bin/true"])
"""


def test_host_process_makes_no_event(tracer: Tracer) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        with tracer.sandbox() as sb:
            host = subprocess.Popen([PYTHON, "-c", CALLS, str(port)])
            assert host.wait() == 0
            # The same calls in the sandbox afterwards: once their events are in, any event
            # of the host process, written earlier, has been read too.
            pid, _, events = sb.python(CALLS, str(port))
    finally:
        srv.close()
    assert {e.kind for e in events if not isinstance(e, LostEvent) and e.process.pid == pid} >= {
        "exec",
        "connect",
        "bind",
        "fork",
    }
    assert len(of(events, "connect", pid)) == 2
    from_host = [
        e
        for e in tracer.events
        if not isinstance(e, LostEvent) and host.pid in (e.process.pid, e.process.ppid)
    ]
    assert from_host == []


def test_grandchild_is_traced(tracer: Tracer) -> None:
    code = """
import subprocess, sys
p = subprocess.run([sys.executable, "-c",
    "import os, subprocess; c = subprocess.Popen(['/usr/bin/true', 'grandchild']); "
    "c.wait(); print(os.getpid(), c.pid)"], capture_output=True, check=True)
print(p.stdout.decode().strip(), flush=True)
"""
    with tracer.sandbox() as sb:
        pid, out, _ = sb.python(code)
        child, grandchild = map(int, out.split())
        sb.wait_exit(grandchild)
        events = sb.events()
    ev = one(events, "exec", grandchild)
    assert ev.argv == [b"/usr/bin/true", b"grandchild"]
    assert ev.process.ppid == child
    assert [a.pid for a in ev.process.ancestry[:2]] == [child, pid]


def test_process_that_leaves_the_sandbox_stays_traced(tracer: Tracer) -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    root = cgroups.find_cgroup2_root()
    # Leaves for the root cgroup, waits until the test has seen the move, then connects
    # (TCP and UDP), binds and runs a program.
    code = f"""
import os, socket, subprocess, sys
with open({str(root / "cgroup.procs")!r}, "w") as f:
    f.write(str(os.getpid()))
print(os.getpid(), flush=True)
sys.stdin.readline()
s = socket.socket(); s.connect(("127.0.0.1", {port})); s.close()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0))
u.connect(("127.0.0.1", 9))
print(u.getsockname()[1], flush=True)
subprocess.run(["/usr/bin/true", "after-move"])
"""
    try:
        with tracer.sandbox() as sb:
            proc = sb.spawn([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert proc.stdin is not None and proc.stdout is not None
            pid = int(proc.stdout.readline())
            tracer.wait_for(
                lambda evs: any(
                    e.kind == "cgroup_move" and getattr(e, "target_pid", 0) == pid for e in evs
                )
            )
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            udp_port = int(proc.stdout.readline())
            proc.stdin.close()
            proc.stdout.close()
            assert proc.wait(timeout=30) == 0
            sb.wait_exit(pid)
            events = sb.events()
    finally:
        srv.close()
    move = one(events, "cgroup_move", pid)
    assert move.target_pid == pid
    assert move.dst_cgroup_path == "/"
    assert move.left_sandbox
    assert move.dst_cgroup_id == cgroups.cgroup_id(root)
    tcp, udp = sorted(of(events, "connect", pid), key=lambda e: e.protocol)
    assert (tcp.protocol, tcp.daddr, tcp.dport, tcp.outcome) == (
        "tcp",
        "127.0.0.1",
        port,
        "success",
    )
    assert tcp.cgroup_id == cgroups.cgroup_id(root)
    assert (udp.protocol, udp.daddr, udp.dport) == ("udp", "127.0.0.1", 9)
    bind = one(events, "bind", pid)
    assert (bind.addr, bind.port) == ("127.0.0.1", udp_port)
    child_exec = [e for e in events if isinstance(e, ExecEvent) and e.process.ppid == pid]
    assert [e.argv for e in child_exec] == [[b"/usr/bin/true", b"after-move"]]
    # The hooks now sit on the root cgroup too; a sandbox below it must not report twice.
    with tracer.sandbox() as sb2:
        udp = "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
        pid2, _, events2 = sb2.python(udp + ".connect(('127.0.0.1', 9))")
    assert one(events2, "connect", pid2).dport == 9
