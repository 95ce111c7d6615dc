"""Tests of collector.proctable: the process table, /proc parsing, and name lookups."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from api.events import AncestorRef
from collector.proctable import Names, ProcessTable, read_proc
from collector.records import split_nul

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _chain(table: ProcessTable) -> None:
    """systemd(1) -> sshd(100) -> bash(200) -> python(300)"""
    table.on_exec(1, 10, 0, b"/sbin/init", [b"/sbin/init"])
    table.on_exec(100, 1000, 1, b"/usr/sbin/sshd", [b"sshd", b"-D"])
    table.on_fork(100, 200, 2000)
    table.on_exec(200, 2000, 100, b"/bin/bash", [b"-bash"])
    table.on_fork(200, 300, 3000)
    table.on_exec(300, 3000, 200, b"/usr/bin/python3", [b"python3", b"x.py"])


def test_ancestry_parent_first_and_stops_before_init() -> None:
    table = ProcessTable()
    _chain(table)
    assert table.ancestry(300) == [
        AncestorRef(pid=200, key="200@2000", exe=b"/bin/bash", argv=[b"-bash"]),
        AncestorRef(pid=100, key="100@1000", exe=b"/usr/sbin/sshd", argv=[b"sshd", b"-D"]),
    ]
    assert [a.pid for a in table.ancestry(300, limit=1)] == [200]
    assert table.ancestry(100) == []
    assert table.ancestry(1) == []
    assert table.ancestry(999) == []


def test_ancestry_stops_at_unknown_parent_and_on_cycles() -> None:
    table = ProcessTable()
    table.on_exec(20, 2000, 10, b"/b", [b"b"])  # parent 10 unknown
    table.on_exec(30, 3000, 20, b"/c", [b"c"])
    assert [a.pid for a in table.ancestry(30)] == [20]
    # a cycle (only possible through bad input) ends the walk
    table.on_exec(40, 4000, 50, b"/d", [b"d"])
    table.on_exec(50, 4000, 40, b"/e", [b"e"])
    assert [a.pid for a in table.ancestry(40)] == [50]


def test_ancestry_ignores_a_parent_pid_reused_by_a_newer_process() -> None:
    table = ProcessTable()
    table.on_exec(100, 1000, 1, b"/old-parent", [])
    table.on_fork(100, 200, 2000)
    table.on_exit(100)
    table.on_exec(100, 5_000_000_000, 1, b"/stranger", [])  # pid 100 reused later
    assert table.ancestry(200) == []


def test_fork_inherits_until_exec() -> None:
    table = ProcessTable()
    table.on_exec(100, 1000, 1, b"/bin/bash", [b"bash", b"-c", b"x"])
    child = table.on_fork(100, 101, 1500)
    assert (child.key, child.ppid, child.exe, child.argv) == (
        "101@1500",
        100,
        b"/bin/bash",
        [b"bash", b"-c", b"x"],
    )
    child.argv.append(b"changed")  # copies, not shared with the parent
    info = table.get(100)
    assert info is not None
    assert info.argv == [b"bash", b"-c", b"x"]
    table.on_exec(101, 1500, 100, b"/usr/bin/curl", [b"curl", b"http://x"])
    info = table.get(101)
    assert info is not None
    assert (info.key, info.exe, info.argv) == ("101@1500", b"/usr/bin/curl", [b"curl", b"http://x"])
    orphan = table.on_fork(555, 556, 9)  # parent unknown
    assert (orphan.exe, orphan.argv, orphan.ppid) == (b"", [], 555)


def test_pid_reuse_gives_a_new_key_and_replaces_the_old_entry() -> None:
    table = ProcessTable()
    table.on_exec(4242, 1000, 1, b"/bin/old", [b"old"])
    table.on_exit(4242)
    old = table.get(4242)
    assert old is not None
    assert old.exited
    table.on_fork(1, 4242, 9_000_000_000)
    new = table.get(4242)
    assert new is not None
    assert new.key == "4242@9000000000"
    assert not new.exited
    assert new.exe == b""  # its parent (1) is not in the table
    assert new is not old
    # an exec with yet another start time is another process again
    table.on_exec(4242, 9_500_000_000, 7, b"/bin/new", [b"new"])
    info = table.get(4242)
    assert info is not None
    assert (info.key, info.ppid, info.exe) == ("4242@9500000000", 7, b"/bin/new")
    assert len(table) == 1


def test_exec_of_a_known_process_keeps_its_key() -> None:
    table = ProcessTable()
    first = table.on_exec(10, 100, 1, b"/bin/sh", [b"sh"])
    second = table.on_exec(10, 100, 1, b"/bin/ls", [b"ls", b""])
    assert second is first
    assert (second.key, second.exe, second.argv) == ("10@100", b"/bin/ls", [b"ls", b""])


def test_exited_entries_are_kept_up_to_the_limit_oldest_evicted() -> None:
    table = ProcessTable(max_entries=100, exited_keep=3)
    for pid in range(10, 20):
        table.on_exec(pid, pid * 10, 1, b"/x", [])
    for pid in range(10, 16):
        table.on_exit(pid)
    # the three most recent exits stay, the older ones are gone
    assert [pid for pid in range(10, 16) if table.get(pid) is not None] == [13, 14, 15]
    assert all(info.exited for pid in (13, 14, 15) if (info := table.get(pid)) is not None)
    assert all(table.get(pid) is not None for pid in range(16, 20))
    assert len(table) == 7
    table.on_exit(15)  # a repeated exit changes nothing
    assert len(table) == 7


def test_max_entries_evicts_exited_first_then_oldest_live() -> None:
    table = ProcessTable(max_entries=5, exited_keep=5)
    for pid in range(1, 6):
        table.on_exec(pid + 100, pid, 1, b"/x", [])
    table.on_exit(104)
    table.on_exec(200, 50, 1, b"/y", [])
    assert table.get(104) is None  # the exited one went first
    assert len(table) == 5
    table.on_exec(201, 51, 1, b"/y", [])
    assert table.get(101) is None  # then the oldest live one
    assert len(table) == 5
    assert table.evicted == 2


def test_bounds_hold_under_churn() -> None:
    table = ProcessTable(max_entries=50, exited_keep=10)
    for i in range(1000):
        pid = 1000 + i % 300
        table.on_fork(1, pid, i * 1000)
        if i % 2:
            table.on_exit(pid)
        assert len(table) <= 50
        assert len(table._exited) <= 10


@pytest.mark.parametrize(
    ("raw", "argv"),
    [
        (b"a\0\0b\0", [b"a", b"", b"b"]),
        (b"a\0", [b"a"]),
        (b"\0", [b""]),
        (b"", []),
        (b"x\0\0", [b"x", b""]),
        (b"nginx: worker process", [b"nginx: worker process"]),  # rewritten, no NUL
        (b"\xff\xfe\0arg\0", [b"\xff\xfe", b"arg"]),
    ],
)
def test_cmdline_split_keeps_empty_args(raw: bytes, argv: list[bytes]) -> None:
    assert split_nul(raw) == argv


def _fake_proc(
    root: Path, pid: int, comm: bytes, *, ppid: int, ticks: int, state: bytes = b"S"
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    rest = [state, str(ppid).encode()] + [b"0"] * 17 + [str(ticks).encode()] + [b"0"] * 30
    (d / "stat").write_bytes(b"%d (%s) " % (pid, comm) + b" ".join(rest) + b"\n")
    (d / "cmdline").write_bytes(b"/opt/a b\0--flag\0\0last\0")
    (d / "exe").symlink_to("/opt/a b")


def test_seed_from_a_fake_proc_with_a_hostile_comm(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 321, b"a) b (c", ppid=77, ticks=12345)
    table = ProcessTable()
    info = table.seed_from_proc(321, proc_root=tmp_path)
    assert info is not None
    start_ns = 12345 * TICK_NS
    assert (info.pid, info.ppid, info.start_ns, info.key) == (321, 77, start_ns, f"321@{start_ns}")
    assert info.exe == b"/opt/a b"
    assert info.argv == [b"/opt/a b", b"--flag", b"", b"last"]
    assert not info.exited
    assert table.get(321) is info
    assert table.seed_from_proc(999, proc_root=tmp_path) is None
    assert read_proc(999, tmp_path) is None


def test_seed_of_a_zombie_marks_it_exited(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 5, b"z)", ppid=1, ticks=1, state=b"Z")
    table = ProcessTable()
    info = table.seed_from_proc(5, proc_root=tmp_path)
    assert info is not None
    assert info.exited


def test_kernel_start_time_refines_a_seeded_entry(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 321, b"x", ppid=77, ticks=500)
    table = ProcessTable()
    seeded = table.seed_from_proc(321, proc_root=tmp_path)
    assert seeded is not None
    precise = 500 * TICK_NS + TICK_NS // 3  # what the kernel records say
    info = table.on_exec(321, precise, 77, b"/bin/true", [b"true"])
    assert info is seeded
    assert info.key == f"321@{precise}"
    # once precise, a different start time is a different process
    other = table.on_exec(321, precise + 1, 77, b"/bin/true", [b"true"])
    assert other is not seeded
    # seeding again does not coarsen the precise entry
    again = table.seed_from_proc(321, proc_root=tmp_path)
    assert again is other
    assert again.start_ns == precise + 1


def test_seed_from_a_real_child_process() -> None:
    argv = [
        sys.executable,
        "-c",
        "import sys; print(flush=True); sys.stdin.read()",
        "",
        "two words",
        "\u00e9",
    ]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # it runs: its exec is done, /proc shows its own argv
        table = ProcessTable()
        info = table.seed_from_proc(child.pid)
        assert info is not None
        assert info.pid == child.pid
        assert info.ppid == os.getpid()
        assert info.exe == os.fsencode(os.path.realpath(sys.executable))
        assert info.argv == [os.fsencode(a) for a in argv]
        assert info.key == f"{child.pid}@{info.start_ns}"
        assert not info.exited
        # started just now: after this test process, before now (boot-relative, in ticks)
        me = read_proc(os.getpid())
        assert me is not None
        assert me.start_ns <= info.start_ns
        # and it is our own parent's child in the ancestry
        table.seed_from_proc(os.getpid())
        assert [a.pid for a in table.ancestry(child.pid)][:1] == [os.getpid()]
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.kill()
        child.wait(timeout=10)
        child.stdout.close()
    assert ProcessTable().seed_from_proc(child.pid) is None


def test_names_resolve_and_cache() -> None:
    names = Names(max_entries=2)
    assert names.user(0) == pwd.getpwuid(0).pw_name == "root"
    assert names.group(0) == grp.getgrgid(0).gr_name
    assert names.user(4_000_000_000) == ""
    assert names.group(4_000_000_000) == ""
    assert names.user(2**40) == ""  # beyond uid_t
    assert len(names._users) <= 2
    assert names.user(0) == "root"


def test_live_pids_leave_out_exited_processes_until_their_pid_is_reused() -> None:
    table = ProcessTable(exited_keep=2)
    _chain(table)
    table.on_fork(300, 301, 4000)
    table.on_fork(300, 302, 4001)
    table.on_exit(301)
    table.on_exit(200)
    assert sorted(table.live_pids()) == [1, 100, 300, 302]
    table.on_fork(300, 301, 9000)  # pid 301 again: a new process, alive
    table.on_exit(302)
    table.on_exit(100)  # one more exit than exited_keep: the oldest exited entry goes
    assert sorted(table.live_pids()) == [1, 300, 301]
    assert table.get(200) is None and table.get(302) is not None
