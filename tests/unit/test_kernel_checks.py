"""What sandtrace says when the host lacks something: what is missing and how to fix it."""

from __future__ import annotations

from pathlib import Path

import pytest

from probes import btf as probe_btf
from probes import kernel


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake host with everything present; tests remove one thing each."""
    btf = tmp_path / "btf" / "vmlinux"
    btf.parent.mkdir()
    btf.write_bytes(b"\x9f\xeb")
    (tmp_path / "modules" / "6.9.0-test" / "build").mkdir(parents=True)
    for cat, ev in [
        ("sched", "sched_process_exec"),
        ("sched", "sched_process_exit"),
        ("sock", "inet_sock_set_state"),
        ("cgroup", "cgroup_attach_task"),
        ("io_uring", "io_uring_create"),
    ]:
        (tmp_path / "tracing" / "events" / cat / ev).mkdir(parents=True)
    (tmp_path / "tracing/events/sched/sched_process_exit/format").write_text(
        "\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n"
    )
    monkeypatch.setattr(kernel, "VMLINUX_BTF", btf)
    monkeypatch.setattr(kernel, "MODULES", tmp_path / "modules")
    monkeypatch.setattr(kernel, "TRACEFS", tmp_path / "tracing")
    (tmp_path / "tracing" / "kprobe_events").write_text("")
    (tmp_path / "kallsyms").write_text(
        "ffffffff821967f0 t packet_create\nffffffff82196f20 t packet_do_bind\n"
    )
    monkeypatch.setattr(kernel, "KALLSYMS", tmp_path / "kallsyms")
    monkeypatch.setattr(kernel, "KPROBE_PMU", tmp_path / "no-kprobe-pmu")
    monkeypatch.setattr("platform.release", lambda: "6.9.0-test")
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(probe_btf.BTF, "from_file", lambda _path: FakeBTF(ATTACH_TYPES))
    return tmp_path


# The optional attach types as this 6.18 kernel's enum bpf_attach_type numbers them.
ATTACH_TYPES = {
    "BPF_CGROUP_INET_INGRESS": 0,
    "BPF_CGROUP_INET_EGRESS": 1,
    "BPF_CGROUP_INET_SOCK_CREATE": 2,
    "BPF_CGROUP_UNIX_CONNECT": 49,
}


class FakeBTF:
    def __init__(self, enum: dict[str, int]) -> None:
        self.enum = enum

    def enum_values(self, name: str) -> dict[str, int]:
        return self.enum if name == "bpf_attach_type" else {}


def test_everything_present(host: Path) -> None:
    features = kernel.check()
    assert features.ring_buffer and features.exit_group_dead and features.io_uring_tracepoint
    assert features.packet_kprobe
    assert features.notes == kernel.BLIND_SPOTS  # said on every kernel: AF_PACKET traffic


def test_packet_sockets_need_kprobes_and_packet_create(host: Path) -> None:
    (host / "tracing" / "kprobe_events").unlink()
    features = kernel.check()
    assert not features.packet_kprobe
    assert features.notes == [
        "this kernel has no kprobes (CONFIG_KPROBE_EVENTS): packet (AF_PACKET) sockets made "
        "in sandboxes are looked for in /proc once a second instead, so one made and closed "
        "between two looks is not reported",
        *kernel.BLIND_SPOTS,
    ]
    (host / "no-kprobe-pmu").mkdir()  # the perf kprobe PMU is enough
    (host / "kallsyms").write_text("ffffffff82196f20 t packet_do_bind\n")
    features = kernel.check()
    assert not features.packet_kprobe
    assert features.notes[0].startswith("no packet_create in this kernel now")
    (host / "kallsyms").write_text("ffffffffc0a01000 t packet_create\t[af_packet]\n")
    assert kernel.check().packet_kprobe  # in a loaded module


def test_optional_hooks_come_from_btf(host: Path) -> None:
    assert kernel.check().attach_types == ATTACH_TYPES


def test_a_kernel_without_the_unix_connect_hook_says_what_is_missed(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = {
        "BPF_CGROUP_INET_INGRESS": 0,
        "BPF_CGROUP_INET_EGRESS": 1,
        "BPF_CGROUP_INET_SOCK_CREATE": 2,
    }
    monkeypatch.setattr(probe_btf.BTF, "from_file", lambda _path: FakeBTF(old))
    features = kernel.check()
    assert features.attach_types == old
    assert features.notes == [
        "kernel 6.9.0-test has no BPF_CGROUP_UNIX_CONNECT hook (Linux 6.7+): connects of "
        "sandboxed processes to unix sockets (docker.sock, containerd.sock, kubelet, ...) are "
        "not seen",
        *kernel.BLIND_SPOTS,
    ]


def test_unreadable_btf_enum_is_said(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_path: Path) -> None:
        raise probe_btf.BTFError("not BTF data")

    monkeypatch.setattr(probe_btf.BTF, "from_file", broken)
    notes = kernel.check().notes
    assert notes[0] == f"could not read bpf_attach_type from {host / 'btf/vmlinux'}: not BTF data"
    assert "no BPF_CGROUP_INET_SOCK_CREATE hook" in notes[1]
    assert "no BPF_CGROUP_INET_EGRESS hook" in notes[2]
    assert "no BPF_CGROUP_INET_INGRESS hook" in notes[3]
    assert "DNS answers are not read" in notes[3]
    assert "no BPF_CGROUP_UNIX_CONNECT hook" in notes[4]


def test_a_kernel_without_io_uring_says_so(host: Path) -> None:
    (host / "tracing/events/io_uring/io_uring_create").rmdir()
    features = kernel.check()
    assert not features.io_uring_tracepoint
    assert features.notes[0] == (
        "tracepoint io_uring:io_uring_create is missing (no io_uring in this kernel): "
        "io_uring instances are not reported"
    )


def test_not_root(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(kernel.KernelSupportError, match=r"needs root.*run it with sudo"):
        kernel.check()


def test_no_btf(host: Path) -> None:
    (host / "btf" / "vmlinux").unlink()
    with pytest.raises(kernel.KernelSupportError, match=r"no BTF.*CONFIG_DEBUG_INFO_BTF"):
        kernel.check()


def test_no_kernel_headers(host: Path) -> None:
    (host / "modules" / "6.9.0-test" / "build").rmdir()
    with pytest.raises(kernel.KernelSupportError, match=r"build is missing.*sudo make setup"):
        kernel.check()


def test_missing_tracepoint(host: Path) -> None:
    (host / "tracing/events/cgroup/cgroup_attach_task").rmdir()
    with pytest.raises(kernel.KernelSupportError, match="cgroup:cgroup_attach_task is missing"):
        kernel.check()


def test_old_kernel_falls_back_to_perf_buffer_and_says_so(
    host: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (host / "modules" / "5.4.0-old" / "build").mkdir(parents=True)
    monkeypatch.setattr("platform.release", lambda: "5.4.0-old")
    (host / "tracing/events/sched/sched_process_exit/format").write_text("no such field\n")
    features = kernel.check()
    assert not features.ring_buffer
    assert not features.exit_group_dead
    assert any("perf buffer" in n for n in features.notes)
    assert any("group_dead" in n for n in features.notes)


def test_tracefs_unmountable(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "TRACEFS", host / "nowhere")
    monkeypatch.setattr("subprocess.run", _fail)
    with pytest.raises(kernel.KernelSupportError, match="sudo mount -t tracefs tracefs"):
        kernel.check()


def _fail(*args: object, **kwargs: object) -> None:
    raise OSError("mount: permission denied")
