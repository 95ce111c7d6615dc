"""Load sandtrace's eBPF programs with BCC, attach them, and read their records.

This is the only module that imports ``bcc``, and it does so lazily inside ``Probes``, so
everything else imports and tests on machines without BCC or root.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from api.resources import shipped
from probes import enforce, kernel
from probes.btf import (
    BTF,
    BTFError,
    exe_file_offsets,
    kernel_offsets,
    kprobe_arg_offsets,
    optional_offsets,
    stdio_offsets,
)
from probes.ringbuf import RingBufferReader

log = structlog.get_logger("sandtrace.probes")

MAIN_SOURCE = "sandtrace.bpf.c"

# bpf_attach_type values (uapi/linux/bpf.h)
_ATTACH = {
    "connect4": 10,
    "connect6": 11,
    "bind4": 8,
    "bind6": 9,
    "post_bind4": 12,
    "post_bind6": 13,
}
SOCKET_HOOKS = tuple(_ATTACH)
"""The cgroup socket programs, which are loaded by name (tracepoint programs load by
themselves when BCC compiles them)."""
REPEAT_WINDOW_NS = 1_000_000_000
"""Connects by one process to one destination beyond REPEAT_BUDGET within this time of the
first are counted in the kernel, not sent (bpf/sock_addr.bpf.c)."""
REPEAT_BUDGET = 1024
_SOCK_F_REPEATS_ONLY = 1 << 2  # events.h; BCC's ctypes mirror of the record is edited
_PROG_TYPE_CGROUP_SKB = 8
_PROG_TYPE_CGROUP_SOCK = 9
_PROG_TYPE_CGROUP_SOCK_ADDR = 18
OPTIONAL_SOCKET_HOOKS: dict[str, tuple[str, int]] = {
    "connect_unix": ("BPF_CGROUP_UNIX_CONNECT", _PROG_TYPE_CGROUP_SOCK_ADDR),
    "sock_create": ("BPF_CGROUP_INET_SOCK_CREATE", _PROG_TYPE_CGROUP_SOCK),
    "skb_egress": ("BPF_CGROUP_INET_EGRESS", _PROG_TYPE_CGROUP_SKB),
    "skb_ingress": ("BPF_CGROUP_INET_INGRESS", _PROG_TYPE_CGROUP_SKB),
}
"""Programs of the hooks a kernel may lack: name -> (their attach type in the kernel's enum
bpf_attach_type, whose value comes from BTF: probes.kernel.OPTIONAL_HOOKS; program type).
Each is compiled only where the kernel has its hook (a HAVE_ flag)."""
_HAVE_FLAG = {
    "BPF_CGROUP_UNIX_CONNECT": "HAVE_UNIX_CONNECT",
    "BPF_CGROUP_INET_SOCK_CREATE": "HAVE_SOCK_CREATE",
    "BPF_CGROUP_INET_EGRESS": "HAVE_UDP_EGRESS",
    "BPF_CGROUP_INET_INGRESS": "HAVE_SKB_INGRESS",
}
DNS_STAGES = ("dns_question", "dns_name", "dns_answers")
"""The programs a DNS answer is parsed with, one after the other by tail call (bpf/include/
flows.h, dns_stages), in the order of its slots."""
FLOW_HOOKS = ("BPF_CGROUP_INET_SOCK_CREATE", "BPF_CGROUP_INET_EGRESS", "BPF_CGROUP_INET_INGRESS")
"""The hooks flows are classified and DNS answers read with (bpf/include/flows.h): every one
is needed."""


_MADV_DONTNEED = 4
_COMPILER_LIBS = re.compile(rb"/lib(LLVM|clang|bcc)[^/]*\.so")


def release_compiler_memory() -> None:
    """Give back the memory that compiling the probes used and running them does not need.

    BCC compiles in-process with clang and LLVM, which leaves ~90 MB of their code resident
    and ~30 MB of freed heap. Their code pages (private, read-execute file mappings that are
    never written) are dropped with MADV_DONTNEED: should the code run again, the kernel
    reads it back from the library file. Freed heap goes back with malloc_trim. Writable or
    relocated mappings are never touched.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps", "rb") as maps:  # noqa: PTH123
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[1] == b"r-xp" and _COMPILER_LIBS.search(fields[5]):
                start, end = (int(x, 16) for x in fields[0].split(b"-"))
                libc.madvise(start, end - start, _MADV_DONTNEED)
    libc.malloc_trim(0)


@dataclass(frozen=True, slots=True)
class _Fn:
    """A program as BCC's detach_func takes it (it reads .fd): one this process did not
    load."""

    fd: int


class ProbeError(RuntimeError):
    """Loading or attaching a probe failed; the message says what to do."""


def build_source(bpf_dir: Path | None = None, main: str = MAIN_SOURCE) -> str:
    """The single compilation unit: `main` (sandtrace.bpf.c, which names every program
    file) with its local includes inlined.

    BCC rewrites map calls and generates tracepoint argument structs only in the main source
    text, not in included files, so our own headers and hook files are inlined here, each
    file once (as an include guard would). Only files from bpf/ are read; nothing from
    outside reaches the C source. Every program file includes what it uses, so any one of
    them is a compilation unit too (tests/kernel/test_compile.py builds each alone).
    """
    bpf_dir = bpf_dir or shipped(__file__, "bpf")
    seen: set[Path] = set()

    def inline(name: str) -> str:
        for d in (bpf_dir, bpf_dir / "include"):
            path = d / name
            if path.is_file():
                break
        else:
            raise ProbeError(f"bpf source {name} not found under {bpf_dir}")
        if path in seen:
            return ""
        seen.add(path)
        return re.sub(
            r'^#include "([\w.]+)"[ \t]*$',
            lambda m: inline(m.group(1)),
            path.read_text(),
            flags=re.MULTILINE,
        )

    return inline(main)


@dataclass(slots=True)
class ProbeConfig:
    ring_pages: int = 1024  # ring buffer size in pages (a power of two); 4 MiB by default
    trace_all: bool = False
    perf_buffer: bool = False  # force the perf buffer even where the ring buffer exists
    queue_bytes: int = 32 << 20  # records waiting for the event loop before drops
    # With any connect hook attached anywhere, the kernel runs its cgroup hook path (socket
    # lock included) on every connect of every process: +200-400 ns per UDP connect here.
    # Without them, TCP connects still come from the TCP state tracepoint; UDP and unix
    # (connect_unix, Linux 6.7+) ones do not.
    connect_hooks: bool = True
    # Likewise for bind (the bind and post_bind hooks): without them, TCP listeners are still
    # seen (listen, from the TCP state tracepoint); binds themselves, and UDP ones, are not.
    bind_hooks: bool = True
    # Connects of one process to one destination: REPEAT_BUDGET sent a window, the rest
    # counted (a window of 0 sends every one: benchmarks of the record path use it).
    repeat_window_ns: int = REPEAT_WINDOW_NS
    repeat_budget: int = REPEAT_BUDGET
    # While records keep coming, the reader hands them to the event loop at most once per
    # this many seconds (a record after a quiet spell goes at once): each hand-over wakes the
    # loop, and a wake-up costs more than assembling several forks, execs and exits (at
    # 1,000 execs/s, 4 ms cost 0.19 s of collector CPU per second of traced work, 20 ms
    # 0.12, 40 ms 0.08, before other savings). It adds at most this much to the latency
    # from syscall to event (target: p99 < 30 ms). A hand-over of HAND_OVER_BUSY_RECORDS
    # or more waits only HAND_OVER_BUSY_INTERVAL: a flood is drained often, so that the
    # rings never fill while the reader waits, and its wake-ups cost nothing per record.
    hand_over_interval: float = 0.025
    # The event loop reads the rings itself while records come at a paced rate (collect(),
    # look_again()): the reader thread then sleeps, and the loop's own timer replaces the
    # thread's wake-up of the loop, a wake-up across CPUs each interval (see start()). Only
    # for a consumer that calls collect() at look_again()'s times: the pipeline.
    loop_reads: bool = False
    # Classify each sandbox socket's first bytes each way and read its DNS answers (cgroup_skb
    # programs on the sandbox cgroups: a cost per packet that only the sandbox's traffic pays).
    flows: bool = True
    # Refuse, in the sandbox cgroups' own hooks, what the sandbox's egress policy does not
    # allow (bpf/include/enforce.h; the policy is written by collector/enforce.py). Needs the
    # connect hooks and flows (DNS answers teach the allowed names' addresses).
    enforce: bool = False


def attach_types(features: kernel.KernelFeatures, flows: bool = True) -> dict[str, int]:
    """Every socket hook this kernel has (and the configuration uses) -> its attach type."""
    out = dict(_ATTACH)
    for name, (hook, _) in OPTIONAL_SOCKET_HOOKS.items():
        if hook in features.attach_types:
            out[name] = features.attach_types[hook]
    if not (flows and has_flows(features)):
        out.pop("skb_ingress", None)
    return out


def has_flows(features: kernel.KernelFeatures) -> bool:
    """Whether this kernel has every hook flows are classified with (FLOW_HOOKS)."""
    return all(hook in features.attach_types for hook in FLOW_HOOKS)


def load_socket_hook(bpf: Any, name: str, features: kernel.KernelFeatures | None = None) -> Any:
    """Load one of SOCKET_HOOKS (or OPTIONAL_SOCKET_HOOKS, whose attach types come from
    `features`) from a compiled BPF object (the verifier checks it now); returns BCC's
    function handle, for attaching."""
    if name in OPTIONAL_SOCKET_HOOKS:
        if features is None:
            raise ProbeError(f"{name}: its attach type comes from the kernel's features")
        hook, prog_type = OPTIONAL_SOCKET_HOOKS[name]
        return bpf.load_func(name.encode(), prog_type, attach_type=features.attach_types[hook])
    prog_type = _PROG_TYPE_CGROUP_SOCK if name.startswith("post_") else _PROG_TYPE_CGROUP_SOCK_ADDR
    return bpf.load_func(name.encode(), prog_type, attach_type=_ATTACH[name])


def uses_perf_buffer(config: ProbeConfig, features: kernel.KernelFeatures) -> bool:
    return config.perf_buffer or not features.ring_buffer


def stdio_flags(btf: BTF) -> list[str]:
    """The flags of the in-kernel capture of the standard streams at exec; none, and a
    warning, when this kernel lacks a member it reads: the collector then reads
    /proc/PID/fd, which misses processes that exit at once."""
    try:
        found = stdio_offsets(btf)
    except BTFError as exc:
        log.warning(
            "standard streams are read from /proc, not captured at exec: processes that "
            "exit at once show them as unknown",
            reason=str(exc),
        )
        return []
    log.info("standard streams captured at exec", sk_protocol=found.protocol_layout)
    return [*(f"-D{k}={v}" for k, v in found.flags.items()), "-DHAVE_STDIO_CAPTURE"]


def exe_file_flags(btf: BTF) -> list[str]:
    """The flags of the executed file's key in exec records (device, change time, size);
    none, and a warning, when this kernel lacks a member it reads: the collector then
    stats each executed file to find it in its identity cache."""
    try:
        found = exe_file_offsets(btf)
    except BTFError as exc:
        log.warning("executed files are looked up with a stat per exec", reason=str(exc))
        return []
    return [*(f"-D{k}={v}" for k, v in found.items()), "-DHAVE_EXE_FILE_KEY"]


def compile_flags(config: ProbeConfig, features: kernel.KernelFeatures) -> list[str]:
    """The -D flags the probes are compiled with: this kernel's struct offsets (from BTF)
    and the configuration's choices."""
    btf = BTF.from_file()
    cflags = [f"-D{k}={v}" for k, v in kernel_offsets(btf).items()]
    for hook in features.attach_types:
        if hook in _HAVE_FLAG:
            cflags += [f"-D{k}={v}" for k, v in optional_offsets(btf, hook).items()]
            cflags.append(f"-D{_HAVE_FLAG[hook]}")
    if config.flows and has_flows(features):
        cflags.append("-DHAVE_FLOWS")
    if config.enforce:
        cflags.append("-DHAVE_ENFORCE")
    cflags += stdio_flags(btf)
    cflags += exe_file_flags(btf)
    cflags.append(f"-DRINGBUF_PAGES={config.ring_pages}")
    cflags.append(f"-DPRIORITY_RINGBUF_PAGES={PRIORITY_RING_PAGES}")
    cflags.append(f"-DREPEAT_WINDOW_NS={config.repeat_window_ns}ULL")
    cflags.append(f"-DREPEAT_BUDGET={config.repeat_budget}")
    cflags.append(f"-DNR_CPUS_POSSIBLE={kernel.possible_cpus()}")
    if features.exit_group_dead:
        cflags.append("-DHAVE_EXIT_GROUP_DEAD")
    if features.io_uring_tracepoint:
        cflags.append("-DHAVE_IO_URING_TP")
    if features.packet_kprobe:
        try:
            args = kprobe_arg_offsets(btf, platform.machine())
        except BTFError as exc:
            log.warning("packet sockets made in sandboxes are not reported", reason=str(exc))
        else:
            cflags += [f"-D{k}={v}" for k, v in args.items()]
            cflags.append("-DHAVE_PACKET_KPROBE")
    if config.trace_all:
        cflags.append("-DTRACE_ALL")
    if uses_perf_buffer(config, features):
        cflags.append("-DUSE_PERF_BUFFER")
    return cflags


@dataclass(slots=True)
class LossCounters:
    kernel: dict[int, int] = field(default_factory=dict)  # per record type
    user: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    # records the kernel could not deliver, per sandbox index (the scope a process is
    # traced for; the last slot, 1023, also takes higher indexes)
    sandboxes: dict[int, int] = field(default_factory=dict)


class RecordQueue:
    """Hand-off from the poll thread to the event loop, bounded in bytes (so memory stays
    bounded whatever the records' sizes); every record that does not fit is counted.

    A record costs its payload plus `overhead` bytes: the Python bytes object around it and
    its list slot (sys.getsizeof(b"") is 33, the slot 8, malloc rounds up), so that the bound
    is the memory the queue really holds, not only the payload."""

    RECORD_OVERHEAD = 48

    def __init__(self, capacity_bytes: int, overhead: int = RECORD_OVERHEAD) -> None:
        self.overhead = overhead
        self._batches: deque[list[bytes]] = deque()
        self._lock = threading.Lock()
        self._records = 0
        self._bytes = 0
        self.capacity = capacity_bytes
        self.dropped = 0

    def put(self, batch: list[bytes]) -> bool:
        """Queue a batch; returns True when the queue was empty before (wake the reader)."""
        over = self.overhead
        size = sum(map(len, batch)) + over * len(batch)
        with self._lock:
            if self._bytes + size > self.capacity:
                kept: list[bytes] = []
                room = self.capacity - self._bytes
                for record in batch:
                    if len(record) + over > room:
                        break
                    kept.append(record)
                    room -= len(record) + over
                self.dropped += len(batch) - len(kept)
                batch, size = kept, sum(map(len, kept)) + over * len(kept)
            if not batch:
                return False
            was_empty = self._records == 0
            self._records += len(batch)
            self._bytes += size
            self._batches.append(batch)
            return was_empty

    def pending(self) -> int:
        """Records waiting to be drained."""
        return self._records

    def drain(self) -> list[list[bytes]]:
        with self._lock:
            out = list(self._batches)
            self._batches.clear()
            self._records = 0
            self._bytes = 0
            return out


PRIORITY_RING_PAGES = 128
"""Pages of the priority ring (bpf/include/output.h): exec, fork, exit and first sightings,
which a flood of other records cannot crowd out."""
_KTIME = struct.Struct("<8xQ")  # record_header.ktime_ns


def in_time_order(priority: list[bytes], main: list[bytes]) -> list[bytes]:
    """The records of both rings as one list in the order they happened (by the kernel's
    timestamp), so that an exec from the priority ring comes before the connects it made,
    and a process's exit after them. Sorted only when the priority ring had any."""
    if not priority:
        return main
    if not main:
        return priority
    return sorted(priority + main, key=lambda rec: _KTIME.unpack_from(rec)[0])


HAND_OVER_BUSY_RECORDS = 1024
HAND_OVER_BUSY_INTERVAL = 0.004


def read_loop(
    poll: Callable[[], None],
    hand_over: Callable[[], int],
    stop: threading.Event,
    interval: float,
) -> None:
    """The reader thread's loop until stop is set: wait for records (poll), hand them over
    (hand_over: how many, 0 when there were none), and after each hand-over let `interval`
    seconds pass before the next (at most HAND_OVER_BUSY_INTERVAL after a hand-over of
    HAND_OVER_BUSY_RECORDS or more). A busy ring so wakes the event loop at most once per
    interval, while a record after a quiet spell goes at once. What the kernel writes
    meanwhile waits in the ring, which sends no wake-up while its reader is behind."""
    while not stop.is_set():
        poll()
        handed = hand_over()
        if handed and interval > 0:
            busy = handed >= HAND_OVER_BUSY_RECORDS
            stop.wait(min(interval, HAND_OVER_BUSY_INTERVAL) if busy else interval)


class Probes:
    """The loaded programs: scope maps, cgroup attachments, and the record reader."""

    def __init__(self, config: ProbeConfig, features: kernel.KernelFeatures) -> None:
        try:
            from bcc import BPF  # noqa: PLC0415 - only this module may need BCC
        except ImportError as exc:
            raise ProbeError(
                f"BCC's Python module cannot be imported ({exc}): install it with "
                "`apt-get install python3-bpfcc` on Debian/Ubuntu (`dnf install python3-bcc` "
                "on Fedora), and run sandtrace with a Python that sees the system's packages "
                "(scripts/setup.sh makes such a .venv); `sandtrace serve` and `sandtrace tail` "
                "need no BCC"
            ) from None

        if config.enforce and not (config.flows and has_flows(features)):
            raise ProbeError(
                "enforcement needs the cgroup socket-create, egress and ingress hooks (DNS "
                "answers are read with them); this kernel lacks "
                + ", ".join(h for h in FLOW_HOOKS if h not in features.attach_types)
            )
        if config.enforce and not config.connect_hooks:
            raise ProbeError("enforcement refuses connects in the connect hooks: keep them")
        self.config = config
        self.features = features
        self.use_perf = uses_perf_buffer(config, features)
        cflags = compile_flags(config, features)
        self._BPF = BPF
        started = time.monotonic()
        try:
            self.bpf = BPF(text=build_source().encode(), cflags=cflags)
        except Exception as exc:
            raise ProbeError(
                f"compiling or loading the probes failed: {exc}; the compiler and verifier "
                "output above says why (run `sudo make setup` if kernel headers are missing)"
            ) from exc
        self.compile_seconds = time.monotonic() - started
        self._attach = attach_types(features, config.flows)
        self.classifies_flows = "skb_ingress" in self._attach
        self._sock_fns = {
            name: load_socket_hook(self.bpf, name, features)
            for name in self._attach
            if (config.connect_hooks or not name.startswith("connect"))
            and (config.bind_hooks or "bind" not in name)
        }
        if self.classifies_flows:
            self._load_dns_stages()
        release_compiler_memory()
        self._attached: dict[Path, int] = {}  # cgroup dir -> fd
        self.queue = RecordQueue(config.queue_bytes)
        self._perf_lost = 0
        self._kernel_lost_seen: dict[int, int] = {}  # the `lost` map at the last losses()
        self._sandbox_lost: dict[int, int] = {}  # the `lost_by_sandbox` map then
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._reader: RingBufferReader | None = None
        self._priority_reader: RingBufferReader | None = None
        self._wake: Callable[[], None] | None = None
        # With config.loop_reads: whether the event loop holds the rings (it reads them in
        # collect(); the reader thread waits on _give_back meanwhile), and when it looks next.
        self._loop_holds = False
        self._give_back = threading.Event()
        self._next_look = 0.0
        self._read_rings: Callable[[], list[bytes]] = list

    def _load_dns_stages(self) -> None:
        """Load the DNS parse's stages into their program array (the verifier checks each)."""
        stages = self.bpf[b"dns_stages"]
        ingress = self.features.attach_types["BPF_CGROUP_INET_INGRESS"]
        for slot, name in enumerate(DNS_STAGES):
            fn = self.bpf.load_func(name.encode(), _PROG_TYPE_CGROUP_SKB, attach_type=ingress)
            stages[ctypes.c_int(slot)] = ctypes.c_int(fn.fd)

    # -- scope ------------------------------------------------------------------------------

    def add_sandbox_cgroup(self, cgroup_id: int, sandbox: int) -> None:
        table = self.bpf[b"sandbox_cgroups"]
        table[table.Key(cgroup_id)] = table.Leaf(sandbox)

    def trace_cgroup(self, cgroup_dir: Path, sandbox: int) -> None:
        """Trace a cgroup subtree as scope `sandbox`: processes in it become traced when first
        seen (in the kernel), and its connect/bind hooks are attached."""
        # A cgroup v2 id is the inode number of its directory.
        self.add_sandbox_cgroup(cgroup_dir.stat().st_ino, sandbox)
        self.attach_cgroup(cgroup_dir)

    def add_traced_pids(self, pids: Iterable[int], sandbox: int) -> None:
        table = self.bpf[b"traced"]
        for pid in pids:
            leaf = table.Leaf()
            leaf.sandbox = sandbox
            table[table.Key(pid)] = leaf

    def traced_pids(self) -> dict[int, int]:
        return {k.value: v.sandbox for k, v in self.bpf[b"traced"].items()}

    def attach_cgroup(self, cgroup_dir: Path) -> None:
        """Attach the connect/bind hooks to a cgroup (and so to its whole subtree).

        Hooks on a cgroup also run for every cgroup below it, so the attached cgroups are
        kept disjoint: a cgroup already covered by an attached ancestor is left as it is,
        and attached descendants of a new one are detached once it covers them. Otherwise a
        process below both would report each connect and bind twice.
        """
        cgroup_dir = cgroup_dir.resolve()
        if any(cgroup_dir.is_relative_to(done) for done in self._attached):
            return
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        done: list[str] = []
        held: set[int] | None = None
        try:
            for name, fn in self._sock_fns.items():
                attach_type = self._attach[name]
                left = []
                if enforce.attached_programs(fd, attach_type):
                    held = enforce.held_program_ids() if held is None else held
                    left = enforce.orphans(fd, attach_type, name, held)
                try:
                    # in the place of a dead collector's program, in one step: a hook that
                    # enforces never goes without a program
                    enforce.attach_replacing(fn.fd, fd, attach_type, left[0][1] if left else None)
                    for _, old_fd in left[1:]:
                        self._BPF.detach_func(_Fn(old_fd), fd, attach_type)
                    if left:
                        log.info(
                            "took over from a collector that is gone",
                            cgroup=str(cgroup_dir),
                            hook=name,
                            programs=[prog_id for prog_id, _ in left],
                        )
                finally:
                    for _, old_fd in left:
                        os.close(old_fd)
                done.append(name)
        except Exception as exc:
            for name in done:
                self._BPF.detach_func(self._sock_fns[name], fd, self._attach[name])
            os.close(fd)
            raise ProbeError(f"attaching socket hooks to {cgroup_dir} failed: {exc}") from exc
        self._attached[cgroup_dir] = fd
        covered = [d for d in self._attached if d != cgroup_dir and d.is_relative_to(cgroup_dir)]
        for below in covered:
            self.detach_cgroup(below)
        log.debug("socket hooks attached", cgroup=str(cgroup_dir))

    def detach_cgroup(self, cgroup_dir: Path) -> None:
        fd = self._attached.pop(cgroup_dir.resolve(), None)
        if fd is None:
            return
        for name, fn in self._sock_fns.items():
            try:
                self._BPF.detach_func(fn, fd, self._attach[name])
            except Exception as exc:  # a removed cgroup has nothing to detach
                log.debug("detach failed", cgroup=str(cgroup_dir), hook=name, error=str(exc))
        os.close(fd)

    def policy(self) -> enforce.KernelPolicy:
        """The enforcement maps (config.enforce)."""
        if not self.config.enforce:
            raise ProbeError("the probes were built without enforcement")
        return enforce.KernelPolicy(self.bpf)

    @property
    def attached_cgroups(self) -> list[Path]:
        return list(self._attached)

    # -- counters ---------------------------------------------------------------------------

    def _sum_percpu(self, name: str) -> dict[int, int]:
        """Non-zero slots of a per-CPU counter array, summed over CPUs. The slots are the C
        enum's values (record_type for `lost`, error_counter for `errors`), as many as the
        map has entries: the map's size is the enum's count, so none is left out."""
        table = self.bpf[name.encode()]
        out: dict[int, int] = {}
        for i in range(table.max_entries):
            total = sum(int(v) for v in table[table.Key(i)])
            if total:
                out[i] = total
        return out

    def drain_repeats(self, now_ns: int | None = None) -> int:
        """Report the counts the kernel holds for destinations whose window ended with no
        later connect to carry them (a flood that stopped, a process that exited): each as
        a connect record flagged SOCK_F_REPEATS_ONLY, put on the record queue like the
        kernel's own; its entry is removed, so the next connect there is sent. Returns how
        many were reported."""
        if not self.config.repeat_window_ns:
            return 0
        now = time.monotonic_ns() if now_ns is None else now_ns  # the kernel's clock
        out: list[bytes] = []
        # connects (sock_addr.bpf.c), and datagrams sent without connect (skb_egress.bpf.c)
        for name, hook in ((b"dest_seen", "connect4"), (b"udp_seen", "skb_egress")):
            if hook not in self._sock_fns:
                continue
            table = self.bpf[name]
            for key, seen in table.items():
                if not seen.count or now - seen.window_ns < self.config.repeat_window_ns:
                    continue
                try:
                    del table[key]
                except KeyError:  # gone meanwhile (the LRU evicted it, or the kernel re-keyed)
                    continue
                rec = seen.rec
                rec.repeats = min(seen.count, 0xFFFFFFFF)
                rec.flags |= _SOCK_F_REPEATS_ONLY
                rec.hdr.ktime_ns = now
                out.append(bytes(rec))
        if out and self.queue.put(out) and self._wake is not None:
            self._wake()
        return len(out)

    def losses(self) -> LossCounters:
        """What was lost, and (first) the repeat counts left in the kernel, which the
        collector asks for as often as for losses."""
        self.drain_repeats()
        kernel_lost = self._sum_percpu("lost")
        # The kernel counts a record in `lost_by_sandbox` exactly when it counts it in
        # `lost` (bpf/include/output.h), so the per-sandbox map (a slot per possible
        # sandbox: most of this method's cost) is only read again when `lost` changed.
        if kernel_lost != self._kernel_lost_seen:
            self._sandbox_lost = self._sum_percpu("lost_by_sandbox")
            self._kernel_lost_seen = kernel_lost.copy()
        if self._perf_lost:
            kernel_lost[0] = kernel_lost.get(0, 0) + self._perf_lost
        return LossCounters(
            kernel_lost,
            self.queue.dropped,
            self._sum_percpu("errors"),
            dict(self._sandbox_lost),
        )

    # -- reading ----------------------------------------------------------------------------

    def collect(self) -> list[list[bytes]]:
        """The records to assemble now: those the reader thread handed over, then, while the
        event loop holds the rings (config.loop_reads), those the rings hold. The loop gives
        the rings back to the thread when they were empty (a quiet spell: the thread waits
        for the kernel's wake-up, and a record goes at once) or held a flood (the thread
        drains them every HAND_OVER_BUSY_INTERVAL, also while the loop assembles)."""
        batches = self.queue.drain()
        now = time.monotonic()
        if not self._loop_holds or now < self._next_look:
            # Not its turn yet: woken by the hand-over that gave it the rings (just read).
            return batches
        records = self._read_rings()
        self._next_look = now + self.config.hand_over_interval
        if records:
            batches.append(records)
        if not records or len(records) >= HAND_OVER_BUSY_RECORDS:
            self._loop_holds = False
            self._give_back.set()
        return batches

    def look_again(self) -> float | None:
        """Seconds until the event loop should call collect() again while it holds the rings
        (nothing wakes it then); None when the reader thread hands records over and wakes it."""
        if not self._loop_holds:
            return None
        return max(0.0, self._next_look - time.monotonic())

    def start(self, wake: Callable[[], None]) -> None:
        """Poll records in a thread of their own; call wake() when the queue becomes non-empty.

        With config.loop_reads (ring buffers only), the thread hands the rings themselves to
        the event loop after a hand-over of fewer than HAND_OVER_BUSY_RECORDS: from then on
        the loop reads them (collect()) every hand_over_interval on its own timer, and the
        thread sleeps until collect() gives them back. A paced stream of records so costs one
        timer wake-up of one thread per interval, not a wake-up of each thread (the loop's
        from the other thread, across CPUs, the dearest on a VM)."""
        batch: list[bytes] = []
        string_at = ctypes.string_at
        self._wake = wake

        def on_record(_ctx: Any, data: Any, size: int) -> int:
            batch.append(string_at(data, size))
            return 0

        def on_perf_lost(count: int) -> None:
            self._perf_lost += count

        events = self.bpf[b"events"]
        if self.use_perf:
            events.open_perf_buffer(
                lambda cpu, data, size: on_record(None, data, size),
                page_cnt=self.config.ring_pages,
                lost_cb=on_perf_lost,
            )

            def poll() -> None:
                self.bpf.perf_buffer_poll(100)  # stop is noticed within 100 ms

            consume: Callable[[], None] = self.bpf.perf_buffer_consume
        else:
            reader = RingBufferReader(events.map_fd, self.config.ring_pages * mmap.PAGESIZE)
            self._reader = reader
            prio_map = self.bpf[b"priority_events"]
            priority = RingBufferReader(prio_map.map_fd, PRIORITY_RING_PAGES * mmap.PAGESIZE)
            self._priority_reader = priority
            reader.also_wake_on(prio_map.map_fd)

            def read_rings() -> list[bytes]:
                return in_time_order(priority.read(), reader.read())

            self._read_rings = read_rings

            def poll() -> None:
                if self._loop_holds:  # the loop reads; wait until it gives the rings back
                    while not self._give_back.wait(1.0) and not self._stop.is_set():
                        pass
                    self._give_back.clear()
                    self._loop_holds = False
                    return
                reader.wait(1.0)  # drain_now() interrupts it: an idle reader sleeps on
                batch.extend(read_rings())

            def consume() -> None:
                while True:
                    records = read_rings()
                    if not records:
                        break
                    batch.extend(records)

        loop_reads = self.config.loop_reads and not self.use_perf

        def flush() -> int:
            # The reader may hand over the ring's whole content at once; the queue bounds it.
            if not batch:
                return 0
            full = batch.copy()
            batch.clear()
            if loop_reads and len(full) < HAND_OVER_BUSY_RECORDS and not self._stop.is_set():
                # Paced: the loop reads from now on, once it has taken these. Given before
                # the wake-up, so that the loop, woken, knows to look again by itself.
                self._give_back.clear()
                self._next_look = time.monotonic() + self.config.hand_over_interval
                self._loop_holds = True
            if self.queue.put(full):
                wake()
            return len(full)

        def run() -> None:
            try:
                read_loop(poll, flush, self._stop, self.config.hand_over_interval)
                consume()
                flush()
            except Exception:
                log.exception("record reader failed")
                wake()

        self._thread = threading.Thread(target=run, name="sandtrace-ring", daemon=True)
        self._thread.start()

    def drain_now(self) -> None:
        """Stop the reader after it has consumed every record the kernel has written (the
        event loop, which calls this, reads no more: the rings are the thread's again)."""
        self._stop.set()
        self._give_back.set()
        if self._reader is not None:
            self._reader.interrupt()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._loop_holds = False

    def close(self) -> None:
        """Detach everything; nothing of sandtrace stays in the kernel afterwards."""
        if self._closed:
            return
        self._closed = True
        self.drain_now()
        if self._reader is not None:
            self._reader.close()
        if self._priority_reader is not None:
            self._priority_reader.close()
        for cgroup_dir in list(self._attached):
            self.detach_cgroup(cgroup_dir)
        self.bpf.cleanup()
