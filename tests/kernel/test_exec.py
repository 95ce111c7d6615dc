"""exec events against ground truth the test creates: pids, paths, exact argv bytes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from api.events import ExecEvent
from collector.records import ARGV_MAX, ARGV_TAIL_MAX
from detect.engine import Engine
from detect.fields import fields_of
from detect.loader import load_paths
from detect.pack import builtin_rules
from tests.kernel.tracer import PYTHON, Sandbox, Tracer, of, one, python_exe

# The sandbox's first process (a python of known pid) starts the program under test and
# prints the child's pid, so that the test knows every id before it looks at events.
SPAWN = """
import os, subprocess, sys
args = [os.fsencode(a) for a in sys.argv[2:]]
p = subprocess.Popen([os.fsencode(sys.argv[1])] + args, cwd=os.environ["CWD"])
p.wait()
print(p.pid, flush=True)
"""


def spawn_child(
    sb: Sandbox, tracer: Tracer, exe: str, args: list[bytes], cwd: str
) -> tuple[int, int, Any]:
    argv = [PYTHON, "-c", SPAWN, exe, *[os.fsdecode(a) for a in args]]
    parent_pid, out, events = sb.run(argv, env={**os.environ, "CWD": cwd})
    child_pid = int(out.split()[0])
    return parent_pid, child_pid, one(events, "exec", child_pid)


def test_exec_fields_and_exact_argv(tracer: Tracer, tmp_path: Path) -> None:
    args = [b"a b", b"'single'", b'"double"', b"", b"\xff\xfe\x80", b"tab\there", b"\x1b[31m", b""]
    with tracer.sandbox() as sb:
        parent_pid, child_pid, ev = spawn_child(sb, tracer, "/usr/bin/true", args, str(tmp_path))
    assert ev.process.pid == child_pid
    assert ev.process.ppid == parent_pid
    assert ev.process.uid == os.getuid()
    assert ev.process.gid == os.getgid()
    assert ev.process.exe == os.path.realpath("/usr/bin/true").encode()
    assert ev.argv == [b"/usr/bin/true", *args]
    assert not ev.argv_truncated
    assert ev.cwd == str(tmp_path).encode()
    assert ev.parent_exe == python_exe()
    assert ev.parent_argv[:2] == [PYTHON.encode(), b"-c"]
    assert ev.filename == b"/usr/bin/true"
    assert not ev.fileless and not ev.deleted
    assert ev.process.key == f"{child_pid}@{ev.process.start_ns}"
    assert ev.process.ns_pid == child_pid  # the sandbox shares the host pid namespace
    # ancestry: the parent python is first
    assert ev.process.ancestry[0].pid == parent_pid


def test_two_hundred_arguments(tracer: Tracer, tmp_path: Path) -> None:
    args = [f"arg{i}".encode() for i in range(200)]
    with tracer.sandbox() as sb:
        _, _, ev = spawn_child(sb, tracer, "/usr/bin/true", args, str(tmp_path))
    assert ev.argv == [b"/usr/bin/true", *args]
    assert len(ev.argv) == 201
    assert not ev.argv_truncated


def test_argv_over_the_limit_keeps_head_and_tail(tracer: Tracer, tmp_path: Path) -> None:
    args = [bytes([65 + i % 26]) * 300 for i in range(100)]  # ~30 KiB
    full = b"\0".join([b"/usr/bin/true", *args]) + b"\0"
    with tracer.sandbox() as sb:
        _, _, ev = spawn_child(sb, tracer, "/usr/bin/true", args, str(tmp_path))
    assert ev.argv_truncated
    assert ev.argv_size == len(full)
    head, tail = full[:ARGV_MAX], full[-ARGV_TAIL_MAX:]
    assert ev.argv == head.split(b"\0") + tail[:-1].split(b"\0")


def test_argv_just_over_the_head_is_whole(tracer: Tracer, tmp_path: Path) -> None:
    """Up to ARGV_MAX + ARGV_TAIL_MAX bytes, head and tail meet: all of argv, not cut."""
    args = [b"x" * 999 for _ in range(18)]  # 18000 bytes with the NULs
    with tracer.sandbox() as sb:
        _, _, ev = spawn_child(sb, tracer, "/usr/bin/true", args, str(tmp_path))
    assert ev.argv == [b"/usr/bin/true", *args]
    assert not ev.argv_truncated


def test_pool_flags_after_padding_are_seen_and_matched(tracer: Tracer, tmp_path: Path) -> None:
    """20 KiB of junk arguments before a miner's pool flags: the flags are in argv (the
    tail), the event says argv was cut, and the built-in stratum rule fires on it."""
    pool = [b"-o", b"stratum+tcp://198.51.100.9:3333", b"-u", b"WALLET", b"-p", b"x"]
    args = [b"-" + b"J" * 1023 for _ in range(20)] + pool
    full = b"\0".join([b"/usr/bin/true", *args]) + b"\0"
    with tracer.sandbox() as sb:
        _, _, ev = spawn_child(sb, tracer, "/usr/bin/true", args, str(tmp_path))
    assert ev.argv_truncated
    assert ev.argv_size == len(full)
    head, tail = full[:ARGV_MAX], full[-ARGV_TAIL_MAX:]
    assert ev.argv == head.split(b"\0") + tail[:-1].split(b"\0")
    assert ev.argv[-6:] == pool
    fields = fields_of(ev)
    assert fields is not None and fields["ArgvTruncated"] == "true"
    assert "-o stratum+tcp://198.51.100.9:3333 -u WALLET -p x" in str(fields["CommandLine"])
    rules = load_paths([builtin_rules()])
    names = {r.id: r.name for r in rules.rules}
    assert "miner_stratum_url" in {names.get(a.rule_id) for a in Engine(rules).feed(ev)}


# Execs the file open at `fd` (execveat with AT_EMPTY_PATH) in a forked child; prints its pid.
FEXECVE = """
pid = os.fork()
if pid == 0:
    os.execve(fd, ARGV, {})
os.waitpid(pid, 0)
print(pid, flush=True)
"""


def fexecve_in_sandbox(tracer: Tracer, prepare: str, argv: list[bytes]) -> ExecEvent:
    """Run `prepare` (which opens `fd`) and FEXECVE in a sandbox; the child's exec event."""
    code = f"import os\nARGV = {argv!r}\n{prepare}\n{FEXECVE}"
    with tracer.sandbox() as sb:
        _, out, _ = sb.python(code)
        child = int(out.split()[0])
        sb.wait_exit(child)
        ev: ExecEvent = one(sb.events(), "exec", child)
    return ev


def test_memfd_execveat_is_fileless(tracer: Tracer) -> None:
    prepare = """
fd = os.memfd_create("payload", 0)
os.write(fd, open("/usr/bin/true", "rb").read())
"""
    ev = fexecve_in_sandbox(tracer, prepare, [b"payload", b"x"])
    assert ev.process.exe == b"/memfd:payload"
    assert ev.fileless
    assert not ev.deleted
    assert ev.argv == [b"payload", b"x"]


def test_memfd_exec_by_proc_path_is_fileless(tracer: Tracer) -> None:
    """execve of /proc/self/fd/N (as fexecve without execveat does): the same memfd."""
    prepare = """
fd = os.memfd_create("by-path", os.MFD_CLOEXEC)
os.write(fd, open("/usr/bin/true", "rb").read())
fd = f"/proc/self/fd/{fd}"
"""
    ev = fexecve_in_sandbox(tracer, prepare, [b"by-path"])
    assert ev.process.exe == b"/memfd:by-path"
    assert ev.fileless
    assert not ev.deleted


def test_deleted_file_named_like_a_memfd_is_not_fileless(tracer: Tracer) -> None:
    """A deleted /memfd:NAME has the path a memfd has, but it is a file in a directory: the
    kernel tells them apart (a memfd is its own parent), so it is deleted, not fileless."""
    target = Path(f"/memfd:sandtrace-test-{os.getpid()}")
    shutil.copy("/usr/bin/true", target)
    prepare = f"""
fd = os.open({str(target)!r}, os.O_RDONLY)
os.unlink({str(target)!r})
"""
    try:
        ev = fexecve_in_sandbox(tracer, prepare, [b"decoy"])
    finally:
        target.unlink(missing_ok=True)
    assert ev.process.exe == str(target).encode()
    assert ev.deleted
    assert not ev.fileless


def test_exec_of_deleted_file_is_marked(tracer: Tracer, tmp_path: Path) -> None:
    target = tmp_path / "gone"
    shutil.copy("/usr/bin/true", target)
    prepare = f"""
fd = os.open({str(target)!r}, os.O_RDONLY)
os.unlink({str(target)!r})
"""
    ev = fexecve_in_sandbox(tracer, prepare, [b"gone"])
    assert ev.deleted
    assert not ev.fileless
    assert ev.process.exe == str(target).encode()


def test_short_lived_process_is_complete(tracer: Tracer, tmp_path: Path) -> None:
    """exec then exit within a millisecond: everything is read at the event itself."""
    with tracer.sandbox() as sb:
        parent_pid, child_pid, ev = spawn_child(
            sb, tracer, "/usr/bin/true", [b"quick"], str(tmp_path)
        )
        exit_ev = one(sb.events(), "exit", child_pid)
    assert ev.argv == [b"/usr/bin/true", b"quick"]
    assert ev.cwd == str(tmp_path).encode()
    assert ev.process.ppid == parent_pid
    assert exit_ev.exit_code == 0 and exit_ev.signal == 0
    assert exit_ev.mono_ns - ev.mono_ns < 1_000_000_000


def test_exit_code_and_signal(tracer: Tracer) -> None:
    code = """
import os, signal, subprocess
a = subprocess.Popen(["/bin/sh", "-c", "exit 7"]); a.wait()
b = subprocess.Popen(["/bin/sleep", "30"]); b.send_signal(signal.SIGKILL); b.wait()
print(a.pid, b.pid, flush=True)
"""
    with tracer.sandbox() as sb:
        _, out, _ = sb.python(code)
        a, b = map(int, out.split())
        sb.wait_exit(b)
        ea = one(sb.events(), "exit", a)
        eb = one(sb.events(), "exit", b)
    assert (ea.exit_code, ea.signal) == (7, 0)
    assert (eb.exit_code, eb.signal) == (0, 9)
    assert of(sb.events(), "fork")  # the forks that made them were seen
