"""Tests of collector.cgroups: mountinfo parsing, id resolution, container ids, sandboxes."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from collector.cgroups import (
    CgroupError,
    CgroupResolver,
    SandboxCgroup,
    cgroup_id,
    container_id_from_path,
    create_sandbox,
    default_scopes,
    find_cgroup2_root,
    pids_in_subtree,
    remove_parent_if_unused,
)

HYBRID = """\
22 27 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

UNIFIED = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
28 25 0:25 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
"""

# a container's view: a bind mount of a subtree first, the real root later
SUBTREE_FIRST = """\
100 90 0:25 /docker/abc /mnt/cg rw,relatime master:4 - cgroup2 cgroup2 rw
101 90 0:25 / /sys/fs/cgroup rw,relatime shared:9 master:4 - cgroup2 cgroup2 rw
"""

SPACE_IN_PATH = "50 1 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw\n"

V1_ONLY = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
"""


@pytest.mark.parametrize(
    ("mountinfo", "expected"),
    [
        (HYBRID, Path("/sys/fs/cgroup/unified")),
        (UNIFIED, Path("/sys/fs/cgroup")),
        (SUBTREE_FIRST, Path("/sys/fs/cgroup")),
        (SPACE_IN_PATH, Path("/mnt/my cgroups")),
    ],
    ids=["hybrid", "unified", "subtree-bind-mount-first", "escaped-space"],
)
def test_find_cgroup2_root(mountinfo: str, expected: Path) -> None:
    assert find_cgroup2_root(mountinfo) == expected


def test_find_cgroup2_root_without_cgroup2_says_how_to_mount() -> None:
    with pytest.raises(CgroupError, match=r"mount -t cgroup2 none /sys/fs/cgroup"):
        find_cgroup2_root(V1_ONLY)
    with pytest.raises(CgroupError):
        find_cgroup2_root("")


def test_find_cgroup2_root_of_this_machine_is_a_cgroup2_dir() -> None:
    root = find_cgroup2_root()
    assert (root / "cgroup.procs").exists()


ID = "4f1c0b7e9a2d3c5b6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5"
ID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
POD = "8c1e5a0b-3f7d-4a2e-9b6c-1d2e3f4a5b6c"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # docker, cgroupfs driver
        (f"/docker/{ID}", ID),
        # docker, systemd driver
        (f"/system.slice/docker-{ID}.scope", ID),
        # a process in a cgroup made inside a docker container
        (f"/system.slice/docker-{ID}.scope/init.scope", ID),
        # docker in docker: the inner container
        (f"/docker/{ID2}/docker/{ID}", ID),
        # containerd (CRI), systemd driver
        (
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{ID}.scope",
            ID,
        ),
        (f"/system.slice/cri-containerd-{ID}.scope", ID),
        # kubelet, cgroupfs driver
        (f"/kubepods/burstable/pod{POD}/{ID}", ID),
        (f"/kubepods/besteffort/pod{POD}/{ID}", ID),
        (f"/kubepods/pod{POD}/{ID}", ID),
        # cri-o
        (
            "/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{POD.replace('-', '_')}.slice/crio-{ID}.scope",
            ID,
        ),
        # podman, systemd driver (rootful, and the nested "container" cgroup)
        (f"/machine.slice/libpod-{ID}.scope", ID),
        (f"/machine.slice/libpod-{ID}.scope/container", ID),
        # podman, cgroupfs driver
        (f"/libpod_parent/libpod-{ID}", ID),
        # nerdctl
        (f"/system.slice/nerdctl-{ID}.scope", ID),
        # not containers
        ("/", ""),
        ("", ""),
        ("/user.slice/user-1000.slice/session-3.scope", ""),
        ("/system.slice/docker.service", ""),
        ("/system.slice/containerd.service", ""),
        ("/sandtrace/st-1a2b3c4d", ""),
        (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice", ""),
        # the monitor scopes of cri-o and podman hold conmon, not the container
        (f"/machine.slice/libpod-conmon-{ID}.scope", ""),
        (f"/kubepods.slice/crio-conmon-{ID}.scope", ""),
        # upper-case or short hex is not an id
        (f"/docker/{ID.upper()}", ""),
        ("/docker/abc123", ""),
    ],
)
def test_container_id_from_path(path: str, expected: str) -> None:
    assert container_id_from_path(path) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cgroup_id_is_the_directory_inode(tmp_path: Path) -> None:
    assert cgroup_id(tmp_path) == tmp_path.stat().st_ino
    with pytest.raises(CgroupError, match="does not exist"):
        cgroup_id(tmp_path / "missing")


def test_resolver_finds_paths_relative_to_root(tmp_path: Path) -> None:
    (tmp_path / "sandtrace" / "st-1a2b").mkdir(parents=True)
    (tmp_path / "system.slice").mkdir()
    resolver = CgroupResolver(tmp_path, clock=FakeClock())
    assert resolver.path_of(cgroup_id(tmp_path / "sandtrace" / "st-1a2b")) == "/sandtrace/st-1a2b"
    # everything else came with the same walk
    assert resolver.path_of(cgroup_id(tmp_path / "system.slice")) == "/system.slice"
    assert resolver.path_of(cgroup_id(tmp_path)) == "/"
    assert resolver.rescans == 1


def test_resolver_rate_limits_rescans(tmp_path: Path) -> None:
    clock = FakeClock()
    resolver = CgroupResolver(tmp_path, rescan_interval=0.1, clock=clock)
    assert resolver.path_of(123456789) == ""
    assert resolver.rescans == 1
    new = tmp_path / "new"
    new.mkdir()
    # within the interval: no walk, so the new cgroup is not seen yet
    clock.now += 0.05
    assert resolver.path_of(cgroup_id(new)) == ""
    assert resolver.path_of(987654321) == ""
    assert resolver.rescans == 1
    clock.now += 0.06
    assert resolver.path_of(cgroup_id(new)) == "/new"
    assert resolver.rescans == 2
    # a hit never walks
    clock.now += 1
    assert resolver.path_of(cgroup_id(new)) == "/new"
    assert resolver.rescans == 2


def test_resolver_note_and_bounded_cache(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"c{i}").mkdir()
    clock = FakeClock()
    resolver = CgroupResolver(tmp_path, max_entries=4, clock=clock)
    resolver.note(42, "/sandtrace/st-00000000")
    assert resolver.path_of(42) == "/sandtrace/st-00000000"
    assert resolver.rescans == 0
    wanted = cgroup_id(tmp_path / "c7")
    assert resolver.path_of(wanted) == "/c7"
    assert len(resolver._cache) == 4
    assert wanted in resolver._cache
    # the noted entry was the oldest and is gone; it is unknown to the tree as well
    clock.now += 1
    assert resolver.path_of(42) == ""


def test_resolver_forgets_nothing_it_needs_after_removal(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    gone_id = cgroup_id(gone)
    resolver = CgroupResolver(tmp_path, clock=FakeClock())
    assert resolver.path_of(gone_id) == "/gone"
    gone.rmdir()
    # late events for a removed cgroup still resolve from the cache
    assert resolver.path_of(gone_id) == "/gone"


def test_pids_in_subtree_reads_every_level(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cgroup.procs").write_text("10\n11\n")
    (tmp_path / "a" / "cgroup.procs").write_text("")
    (tmp_path / "a" / "b" / "cgroup.procs").write_text("12\n")
    assert pids_in_subtree(tmp_path) == {10, 11, 12}
    assert pids_in_subtree(tmp_path / "a") == {12}
    assert pids_in_subtree(tmp_path / "missing") == set()


def test_default_scopes_picks_existing_container_parents(tmp_path: Path) -> None:
    for rel in (
        "sandtrace/st-1",
        "docker",
        f"system.slice/docker-{ID}.scope",
        "system.slice/docker.service",
        "system.slice/containerd.service",
        "system.slice/ssh.service",
        "kubepods.slice",
        f"machine.slice/libpod-{ID}.scope",
        f"machine.slice/libpod-conmon-{ID}.scope",
        "user.slice",
    ):
        (tmp_path / rel).mkdir(parents=True)
    assert default_scopes(tmp_path) == sorted(
        [
            tmp_path / "sandtrace",
            tmp_path / "docker",
            tmp_path / f"system.slice/docker-{ID}.scope",
            tmp_path / "kubepods.slice",
            tmp_path / f"machine.slice/libpod-{ID}.scope",
        ]
    )


def test_create_sandbox_outside_a_cgroup2_hierarchy_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="mount -t cgroup2"):
        create_sandbox(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_default_scopes_of_an_empty_root(tmp_path: Path) -> None:
    assert default_scopes(tmp_path) == []


# --- against the real cgroup2 hierarchy ----------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[SandboxCgroup]:
    root = find_cgroup2_root()
    parent_existed = (root / "sandtrace").exists()
    sb = create_sandbox(root)
    try:
        yield sb
    finally:
        sb.destroy()
        if not parent_existed:  # leave the machine as it was; fine if others use it now
            remove_parent_if_unused(root)


@pytest.mark.kernel
def test_the_shared_parent_goes_only_once_no_sandbox_is_in_it() -> None:
    root = find_cgroup2_root()
    parent = f"sandtrace-test-{os.getpid()}"  # its own, whatever else runs sandboxes now
    sb = create_sandbox(root, parent=parent)
    try:
        assert remove_parent_if_unused(root, parent) is False
        assert (root / parent).is_dir()
    finally:
        sb.destroy()
        gone = remove_parent_if_unused(root, parent)
    assert gone is True
    assert not (root / parent).exists()
    assert remove_parent_if_unused(root, parent) is True  # already gone


def _spawn_sleep() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "1000"])


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


@pytest.mark.kernel
def test_create_and_destroy_a_real_sandbox(sandbox: SandboxCgroup) -> None:
    root = find_cgroup2_root()
    assert sandbox.path.parent == root / "sandtrace"
    assert sandbox.name.startswith("st-")
    assert len(sandbox.name) == 11
    int(sandbox.name[3:], 16)
    assert sandbox.id == sandbox.path.stat().st_ino
    resolver = CgroupResolver(root)
    assert resolver.path_of(sandbox.id) == f"/sandtrace/{sandbox.name}"

    outer = _spawn_sleep()
    inner = _spawn_sleep()
    try:
        sandbox.add_pid(outer.pid)
        nested = SandboxCgroup("inner", sandbox.path / "inner", 0)
        nested.path.mkdir()
        nested.add_pid(inner.pid)
        (sandbox.path / "inner" / "deeper").mkdir()
        assert sandbox.pids() == {outer.pid, inner.pid}
        own = Path("/proc/self/cgroup").read_text()
        assert sandbox.name not in own  # the test itself stayed outside

        sandbox.destroy()

        assert not sandbox.path.exists()
        assert outer.wait(timeout=10) == -signal.SIGKILL
        assert inner.wait(timeout=10) == -signal.SIGKILL
        sandbox.destroy()  # a second call is harmless
    finally:
        _reap(outer)
        _reap(inner)


@pytest.mark.kernel
def test_add_pid_of_a_dead_process_is_a_clear_error(sandbox: SandboxCgroup) -> None:
    proc = _spawn_sleep()
    _reap(proc)
    with pytest.raises(CgroupError, match="no such process"):
        sandbox.add_pid(proc.pid)


def _dead(pid: int) -> bool:
    """Gone, or a zombie waiting for its (re)parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(b")") + 2 :].startswith(b"Z")


@pytest.mark.kernel
def test_destroy_kills_processes_forked_inside(sandbox: SandboxCgroup) -> None:
    procs = sandbox.path / "cgroup.procs"
    # the shell moves itself in, then forks two children inside the sandbox
    shell = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$1"; sleep 1000 & sleep 1000 & echo ready; wait', "sh", procs],
        stdout=subprocess.PIPE,
    )
    try:
        assert shell.stdout is not None
        assert shell.stdout.readline() == b"ready\n"
        inside = sandbox.pids()
        assert len(inside) == 3
        assert shell.pid in inside

        sandbox.destroy()

        assert not sandbox.path.exists()
        assert shell.wait(timeout=10) == -signal.SIGKILL
        assert all(_dead(pid) for pid in inside)
    finally:
        _reap(shell)
        if shell.stdout is not None:
            shell.stdout.close()


@pytest.mark.kernel
def test_destroy_without_cgroup_kill_freezes_and_signals(
    sandbox: SandboxCgroup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("collector.cgroups._KILL_FILE", "no-such-file")  # an older kernel
    procs = sandbox.path / "cgroup.procs"
    shell = subprocess.Popen(
        ["sh", "-c", 'echo $$ > "$1"; sleep 1000 & echo ready; wait', "sh", procs],
        stdout=subprocess.PIPE,
    )
    try:
        assert shell.stdout is not None
        assert shell.stdout.readline() == b"ready\n"
        inside = sandbox.pids()
        assert len(inside) == 2
        sandbox.destroy()
        assert not sandbox.path.exists()
        assert shell.wait(timeout=10) == -signal.SIGKILL
        assert all(_dead(pid) for pid in inside)
    finally:
        _reap(shell)
        if shell.stdout is not None:
            shell.stdout.close()
