"""`python -m bench --only identity`: what completing exec events costs the collector.

1. a new executable: reading it once for SHA-256 and MD5 (and its Go build information),
   per MiB and per file, over the programs in /usr/bin (page cache warm, as a file just
   written or just exec'd is); the dpkg digest index, built once;
2. an exec of a known file: the collector's per-exec work without and with the enrichment
   (assembling exec records alone, then also finding the file in the cache and the
   event's copy), the file found by the version the exec probe read (no system call) and
   by one stat of /proc/PID/exe (the fallback where the probe could not read it); the
   three readlinks of the standard streams where the probe could not capture them; and
   what the enrichment is at 1,000 execs/s;
3. a standard stream that is a socket: one sock_diag lookup (then cached per socket);
4. the cache's hit rate over an agent-like exec mix traced by a real `sandtrace run`: shell
   pipelines, git, python, coreutils, and a C program compiled and run every tenth round
   (each build a new file, and the compiler's own programs).
"""

from __future__ import annotations

import os
import re
import resource
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from api.events import AnyEvent
from bench import Row
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.enrich import ExecEnricher
from collector.identity import Identities, PendingFile
from collector.packages import PackageIndex
from collector.sockets import find_socket
from collector.stdio import StdioReader

HERE = Path(__file__).resolve().parent
EXECS = 20_000
ROUNDS = 5
MIX_ROUNDS = 100

# One round of an agent's work, as a shell script; every tenth round also builds and runs
# a new C program (a new file for the cache, like any freshly built or downloaded tool).
MIX = r"""
set -e
cd "$1"
printf 'int main(void){return 0;}\n' > t.c
git init -q repo 2>/dev/null || true
for i in $(seq 1 "$2"); do
    ls -la . | grep -c t >/dev/null
    cat t.c | sed 's/main/x/' | wc -l >/dev/null
    git -C repo status --short >/dev/null
    python3 -c 'pass'
    find . -maxdepth 1 -name '*.c' | sort | head -1 >/dev/null
    env | grep -q PATH
    date +%s >/dev/null; id -u >/dev/null; uname -r >/dev/null
    if [ $((i % 10)) -eq 0 ]; then
        cc -O0 -o "prog$i" t.c && "./prog$i"
    fi
done
"""


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def hashing() -> tuple[list[Row], float]:
    files = sorted(p for p in Path("/usr/bin").iterdir() if p.is_file() and not p.is_symlink())
    packages = PackageIndex()
    t0 = time.perf_counter()
    packages.original(b"\0" * 16, b"")  # builds the index
    index_ms = (time.perf_counter() - t0) * 1000
    for f in files:  # warm the page cache
        f.read_bytes()
    best: list[float] = []
    per_file: list[float] = []
    total = 0
    for r in range(ROUNDS):
        ids = Identities(packages)
        spent = 0.0
        total = 0
        per_file = []
        for f in files:
            st = f.stat()
            fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
            item = PendingFile((st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size), fd, b"")
            t0 = time.perf_counter()
            ids.resolve(item)
            dt = time.perf_counter() - t0
            spent += dt
            per_file.append(dt)
            total += st.st_size
        best.append(spent)
        progress(f"hashing round {r + 1}/{ROUNDS}: {total / 2**20 / spent:,.0f} MiB/s")
    spent = min(best)
    mib = total / 2**20
    sizes = sorted(f.stat().st_size for f in files)
    return [
        (
            "new executable: read + digests (us/MiB)",
            "",
            f"{spent / mib * 1e6:,.0f}",
            f"{len(files)} files of /usr/bin, {mib:,.0f} MiB",
        ),
        (
            "new executable, median file (us)",
            "",
            f"{statistics.median(per_file) * 1e6:,.0f}",
            f"median size {sizes[len(sizes) // 2] // 1024:,} KiB",
        ),
        (
            "dpkg digest index, built once (ms)",
            "",
            f"{index_ms:,.0f}",
            "in the worker, at the first new file",
        ),
    ], spent / mib


# Three standard streams as the exec probe captures them: /dev/null, open (kernel_entry)
_NULL_FD = R.layout(R.StdioFd).struct.pack(
    0, b"", R.STDIO_F_OPEN, stat.S_IFCHR | 0o666, 1 << 20 | 3, 0, 0, 0, 0, 0
)


def _exec_records(pid: int, exe: Path, count: int, *, kernel_key: bool) -> list[bytes]:
    """`count` copies of one exec record of `pid` running `exe`, its standard streams
    captured by the kernel (as they are wherever the probe can read the fd table); with
    `kernel_key`, also the file's version the probe reads (EXEC_F_FILE_KEY)."""
    layout = R.layout(R.ExecRecord)
    parts = [p.encode() for p in reversed(exe.parts[1:])]
    path = b"".join(p + b"\0" for p in parts)
    data = b"x\0" + path
    st = exe.stat()
    values = {
        "type": R.REC_EXEC,
        "version": R.LAYOUT_VERSION,
        "ktime_ns": 1,
        "pid": pid,
        "tid": pid,
        "ns_pid": pid,
        "ppid": 1,
        "start_ns": 5,
        "comm": b"bench",
        "argv_size": 2,
        "argv_full_size": 2,
        "exe_size": len(path),
        "exe_ino": st.st_ino,
        "flags": R.EXEC_F_STDIO,
        "stdio": _NULL_FD * R.STDIO_FDS,
    }
    if kernel_key:
        values["flags"] = R.EXEC_F_STDIO | R.EXEC_F_FILE_KEY
        values["exe_dev"] = os.major(st.st_dev) << 20 | os.minor(st.st_dev)
        values["exe_ctime_ns"] = st.st_ctime_ns
        values["exe_file_size"] = st.st_size
    fixed = [values.get(n, b"" if c.endswith("s") else 0) for n, c in layout.codes.items()]
    record = layout.struct.pack(*fixed) + data
    return [record] * count


def per_exec() -> tuple[list[Row], float]:
    """Per-exec cost on a hit, for a live process (a sleep whose fds are /dev/null, a pipe
    and a file, so every readlink answers): the file found by the version the kernel read
    (no system call), and, where the probe could not read it, by a stat of /proc/PID/exe;
    the two alternate in each round. Then the three readlinks of the streams, for an exec
    whose streams the kernel could not capture."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            ["/usr/bin/sleep", "600"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
        try:
            time.sleep(0.2)
            exe = Path(f"/proc/{proc.pid}/exe").readlink()
            enricher = ExecEnricher(Identities(PackageIndex()), StdioReader())
            ways = {}
            for way, kernel_key in (("kernel", True), ("stat", False)):
                asm = Assembler([Scope("b", ["/"])], lambda _i: "", lambda _p: "", host="h")
                records = _exec_records(proc.pid, exe, EXECS, kernel_key=kernel_key)
                ways[way] = (asm, records)
            asm, records = ways["kernel"]
            warm: list[AnyEvent] = asm.feed_batches([records[:1]])[0]
            batch = enricher.begin(warm, asm.exec_file_keys)  # the one miss
            if batch is not None:
                batch.work()
                batch.apply()
            base: dict[str, list[float]] = {"kernel": [], "stat": []}
            full: dict[str, list[float]] = {"kernel": [], "stat": []}
            hits: dict[str, int] = {"kernel": 0, "stat": 0}
            stdio = []
            for _ in range(ROUNDS):
                for way, (asm, records) in ways.items():
                    before = enricher.identities.stats.hits
                    t0 = time.process_time()
                    events, _ = asm.feed_batches([records])
                    t1 = time.process_time()
                    if enricher.begin(events, asm.exec_file_keys) is not None:
                        raise RuntimeError(f"per exec ({way}): an exec of a known file missed")
                    t2 = time.process_time()
                    base[way].append((t1 - t0) / EXECS)
                    full[way].append((t2 - t0) / EXECS)
                    hits[way] += enricher.identities.stats.hits - before
                t0 = time.process_time()
                for _i in range(EXECS):
                    enricher.stdio.read(proc.pid)
                stdio.append((time.process_time() - t0) / EXECS)
            enricher.close()
        finally:
            proc.kill()
            proc.communicate()
    bk, fk = min(base["kernel"]), min(full["kernel"])
    bs, fs = min(base["stat"]), min(full["stat"])
    s = min(stdio)
    progress(
        f"per exec: assembly {bk * 1e6:.1f} us; with enrichment {fk * 1e6:.1f} us (kernel's "
        f"key), {fs * 1e6:.1f} us (stat)"
    )
    return [
        (
            "collector per exec, known file by the kernel's key (us)",
            f"{bk * 1e6:.1f}",
            f"{fk * 1e6:.1f}",
            f"+{(fk - bk) * 1e6:.1f} us, no system call; {hits['kernel']:,} cache hits",
        ),
        (
            "collector per exec, known file by stat, the fallback (us)",
            f"{bs * 1e6:.1f}",
            f"{fs * 1e6:.1f}",
            f"+{(fs - bs) * 1e6:.1f} us, one stat of /proc/PID/exe; {hits['stat']:,} cache hits",
        ),
        ("  streams not captured by the kernel: three readlinks (us)", "", f"{s * 1e6:.1f}", ""),
        ("enrichment at 1,000 execs/s (CPU share)", "", f"{(fk - bk) * 1000:.2%}", "of one core"),
    ], fk - bk


def socket_lookup() -> list[Row]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        conn, _ = listener.accept()
        try:
            inode = os.fstat(client.fileno()).st_ino
            times = []
            for _ in range(50):
                t0 = time.perf_counter()
                found = find_socket(os.getpid(), inode)
                times.append(time.perf_counter() - t0)
            if found is None:
                raise RuntimeError("sock_diag did not find the bench's own socket")
        finally:
            client.close()
            conn.close()
    return [
        (
            "stdio socket, sock_diag lookup (us)",
            "",
            f"{min(times) * 1e6:,.0f}",
            f"median {statistics.median(times) * 1e6:,.0f}; once per socket",
        )
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def hit_rate(enrich_s: float, hash_s_per_mib: float) -> list[Row]:
    """The mix traced, and once untraced for the CPU time of the traced work itself."""
    with tempfile.TemporaryDirectory() as work:
        cpu0 = _children_cpu()
        subprocess.run(
            ["/bin/sh", "-c", MIX, "mix", work, str(MIX_ROUNDS)],
            capture_output=True,
            check=True,
            timeout=900,
        )
        work_cpu = _children_cpu() - cpu0
    with tempfile.TemporaryDirectory() as work:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "run",
                "--json",
                "--no-tail",
                "--no-detect",
                "--",
                "/bin/sh",
                "-c",
                MIX,
                "mix",
                work,
                str(MIX_ROUNDS),
            ],
            capture_output=True,
            text=True,
            cwd=HERE.parent,
            check=False,
            timeout=900,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"the exec mix failed: {proc.stderr[-2000:]}")
    m = re.search(
        r"exec identity: (\d+) cache hits, (\d+) files hashed \(([\d.]+) MiB\), (\d+) too "
        r"large to hash, (\d+) unreachable; stdio: (\d+) captured at exec, (\d+) read, "
        r"(\d+) gone",
        proc.stderr,
    )
    if m is None:
        raise RuntimeError(f"no identity totals in: {proc.stderr[-2000:]}")
    hits, files, mib, _large, failed, captured, read, gone = (float(g) for g in m.groups())
    execs = proc.stdout.count('"kind":"exec"')
    answered = hits + files
    spent = enrich_s * execs + hash_s_per_mib * mib  # every exec's lookup, every file read
    progress(f"exec mix: {execs} execs, {hits:.0f} hits, {files:.0f} files, {failed:.0f} failed")
    return [
        (
            "identity cache hit rate, agent-like mix",
            "",
            f"{hits / answered:.1%}",
            f"{execs:,} execs; {files:.0f} files read ({mib:.1f} MiB), {failed:.0f} unreachable",
        ),
        (
            "stdio known (captured at exec, or read while the process ran)",
            "",
            f"{(captured + read) / max(captured + read + gone, 1):.1%}",
            f"{captured:.0f} captured, {read:.0f} read, {gone:.0f} gone or exec'd again first",
        ),
        (
            "enrichment / the traced work's CPU",
            "",
            f"{spent / work_cpu:.2%}",
            f"mix: {work_cpu / execs * 1e6:,.0f} us CPU/exec; hits + hashing; budget: "
            "whole collector <= 10%",
        ),
    ]


def identity_costs() -> list[Row]:
    rows, hash_s_per_mib = hashing()
    exec_rows, enrich_s = per_exec()
    rows += exec_rows
    rows += socket_lookup()
    progress(f"exec mix: {MIX_ROUNDS} rounds, untraced then under sandtrace run")
    rows += hit_rate(enrich_s, hash_s_per_mib)
    return rows
