"""What the running kernel offers, checked before anything is loaded.

Each check that fails names what is missing and the command that fixes it. Where a fallback
exists (perf buffer instead of ring buffer, mounting tracefs ourselves) it is used and said.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
MODULES = Path("/lib/modules")


class KernelSupportError(RuntimeError):
    """The kernel or host lacks something sandtrace needs; the message says how to fix it."""


@dataclass(slots=True)
class KernelFeatures:
    release: str
    ring_buffer: bool
    exit_group_dead: bool
    notes: list[str] = field(default_factory=list)  # fallbacks chosen, said at startup
    # Optional cgroup attach types this kernel has (OPTIONAL_HOOKS), with their values in its
    # enum bpf_attach_type: read from BTF, since BCC's own table predates the newer ones.
    attach_types: dict[str, int] = field(default_factory=dict)
    io_uring_tracepoint: bool = False  # io_uring:io_uring_create exists
    packet_kprobe: bool = False  # packet_create can be kprobed (packet socket creation)


BLIND_SPOTS = [
    "AF_PACKET (packet) sockets: a sandbox's are events when made (a kprobe on "
    "packet_create; without kprobes, found held in /proc within a second), their traffic "
    "is not seen: frames sent or read on them pass no connect, bind or cgroup hook, and a "
    "hook on every packet would slow the whole host",
]
"""What no hook sandtrace uses can see on any kernel; said at startup with the notes."""

KALLSYMS = Path("/proc/kallsyms")
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe")
PACKET_CREATE = "packet_create"  # af_packet's socket() handler: kprobed for packet sockets


def has_kprobes() -> bool:
    """Whether BPF programs can be attached to kprobes: the perf kprobe PMU (Linux 4.17+)
    or tracefs's kprobe_events."""
    return KPROBE_PMU.is_dir() or (TRACEFS / "kprobe_events").exists()


def has_kernel_function(name: str) -> bool:
    """Whether the running kernel has function `name` (built in or in a loaded module)."""
    try:
        with KALLSYMS.open("rb") as f:
            wanted = name.encode()
            return any(line.split()[2:3] == [wanted] for line in f)
    except OSError:
        return False


# Optional cgroup hooks: attach type -> (the kernel that brought it, what is missed without it).
OPTIONAL_HOOKS: dict[str, tuple[str, str]] = {
    "BPF_CGROUP_INET_SOCK_CREATE": (
        "4.10",
        "raw IP sockets, and UDP datagrams sent without connect(), made in sandboxes are not seen",
    ),
    "BPF_CGROUP_INET_EGRESS": (
        "4.10",
        "UDP datagrams sent without connect() are not seen; flows are not classified by "
        "protocol and DNS answers are not read",
    ),
    "BPF_CGROUP_INET_INGRESS": (
        "4.10",
        "flows are not classified by protocol, and DNS answers are not read: connects carry "
        "no host name",
    ),
    "BPF_CGROUP_UNIX_CONNECT": (
        "6.7",
        "connects of sandboxed processes to unix sockets (docker.sock, containerd.sock, "
        "kubelet, ...) are not seen",
    ),
}


def optional_attach_types(notes: list[str], release: str) -> dict[str, int]:
    """The OPTIONAL_HOOKS this kernel has, from its BTF; a note for each one it lacks."""
    from probes.btf import BTF, BTFError  # noqa: PLC0415 - parsed only when checking

    try:
        enum = BTF.from_file(VMLINUX_BTF).enum_values("bpf_attach_type")
    except (BTFError, OSError, ValueError, IndexError) as exc:
        enum = {}
        notes.append(f"could not read bpf_attach_type from {VMLINUX_BTF}: {exc}")
    found = {name: enum[name] for name in OPTIONAL_HOOKS if name in enum}
    for name, (since, missed) in OPTIONAL_HOOKS.items():
        if name not in found:
            notes.append(f"kernel {release} has no {name} hook (Linux {since}+): {missed}")
    return found


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        return (0, 0)
    return int(m.group(1)), int(m.group(2))


def ensure_tracefs(notes: list[str]) -> None:
    if (TRACEFS / "events").is_dir():
        return
    try:
        subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", str(TRACEFS)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KernelSupportError(
            f"tracefs is not mounted at {TRACEFS} and mounting it failed ({exc}); "
            f"run: sudo mount -t tracefs tracefs {TRACEFS}"
        ) from None
    notes.append(f"mounted tracefs at {TRACEFS}")


def tracepoint_has_field(category: str, event: str, name: str) -> bool:
    fmt = TRACEFS / "events" / category / event / "format"
    try:
        text = fmt.read_text()
    except OSError:
        return False
    return re.search(rf"\bfield:[^;]*\b{re.escape(name)};", text) is not None


def check(require_root: bool = True) -> KernelFeatures:
    """Check the host; raise KernelSupportError naming the first thing missing."""
    notes: list[str] = []
    if require_root and os.geteuid() != 0:
        raise KernelSupportError(
            "sandtrace loads eBPF programs and needs root (CAP_BPF, CAP_PERFMON, "
            "CAP_SYS_ADMIN): run it with sudo"
        )
    release = platform.release()
    if not VMLINUX_BTF.exists():
        raise KernelSupportError(
            f"{VMLINUX_BTF} is missing: this kernel has no BTF "
            "(CONFIG_DEBUG_INFO_BTF=y), which sandtrace needs to read struct offsets; "
            "use a distribution kernel built with BTF"
        )
    build = MODULES / release / "build"
    if not build.exists():
        raise KernelSupportError(
            f"{build} is missing: BCC compiles the probes against kernel headers; "
            "run: sudo make setup (installs headers, or links the nearest ones)"
        )
    ensure_tracefs(notes)
    for category, event in (
        ("sched", "sched_process_exec"),
        ("sched", "sched_process_exit"),
        ("sock", "inet_sock_set_state"),
        ("cgroup", "cgroup_attach_task"),
    ):
        if not (TRACEFS / "events" / category / event).is_dir():
            raise KernelSupportError(
                f"tracepoint {category}:{event} is missing from this kernel; sandtrace needs it"
            )
    ring = kernel_version(release) >= (5, 8)
    if not ring:
        notes.append("kernel before 5.8 has no BPF ring buffer: using the perf buffer")
    group_dead = tracepoint_has_field("sched", "sched_process_exit", "group_dead")
    if not group_dead:
        notes.append("sched_process_exit has no group_dead: process exit taken at leader exit")
    attach_types = optional_attach_types(notes, release)
    io_uring = (TRACEFS / "events" / "io_uring" / "io_uring_create").is_dir()
    if not io_uring:
        notes.append(
            "tracepoint io_uring:io_uring_create is missing (no io_uring in this kernel): "
            "io_uring instances are not reported"
        )
    packet = False
    if not has_kprobes():
        notes.append(
            "this kernel has no kprobes (CONFIG_KPROBE_EVENTS): packet (AF_PACKET) sockets "
            "made in sandboxes are looked for in /proc once a second instead, so one made "
            "and closed between two looks is not reported"
        )
    elif not has_kernel_function(PACKET_CREATE):
        notes.append(
            f"no {PACKET_CREATE} in this kernel now (no AF_PACKET, or af_packet is a module "
            "not loaded yet): packet (AF_PACKET) sockets made in sandboxes are looked for in "
            "/proc once a second instead, so one made and closed between two looks is not "
            "reported"
        )
    else:
        packet = True
    notes.extend(BLIND_SPOTS)
    return KernelFeatures(release, ring, group_dead, notes, attach_types, io_uring, packet)


def possible_cpus() -> int:
    """Number of possible CPUs (ids 0..n-1), for per-CPU buffers indexed by CPU id."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    last = 0
    for part in text.split(","):
        last = max(last, int(part.split("-")[-1]))
    return last + 1
