"""`make bench`: sandtrace's speed figures, measured side by side in one run.

1. host overhead: ns per call for a process outside every sandbox, probes loaded vs not;
2. sandbox throughput: connect events decoded per second from a sandboxed flood, and loss;
3. latency from the syscall to the decoded event at 1,000 events per second;
4. collector resident memory and time from start to the first event.
"""

from __future__ import annotations

import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from collector import cgroups
from collector import records as R
from collector.assemble import Assembler, Scope
from collector.events import ConnectEvent
from probes import kernel
from probes.loader import ProbeConfig, Probes

HERE = Path(__file__).resolve().parent
HOST_OPS = {"getppid": 2_000_000, "connect": 300_000, "bind": 100_000, "fork+exec": 400}
ROUNDS = 5


def build_micro(tmp: Path) -> Path:
    exe = tmp / "micro"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(HERE / "micro.c")], check=True)
    return exe


def micro(exe: Path, op: str, n: int, sandbox: cgroups.SandboxCgroup | None = None) -> float:
    out = subprocess.run(
        [str(exe), op, str(n)],
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=sandbox.join if sandbox else None,
    ).stdout
    return float(out)


def host_costs(exe: Path) -> dict[str, float]:
    return {
        op: micro(exe, op if op != "fork+exec" else "forkexec", n) for op, n in HOST_OPS.items()
    }


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root (loads eBPF programs): sudo make bench", file=sys.stderr)
        return 2
    features = kernel.check()
    root = cgroups.find_cgroup2_root()
    rows: list[tuple[str, str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        exe = build_micro(Path(tmpdir))

        # 4 (part): time to first event, measured from a cold start of the probes
        t_start = time.monotonic()
        probes = Probes(ProbeConfig(), features)
        sandbox = cgroups.create_sandbox(root)
        try:
            probes.trace_cgroup(sandbox.path, 0)
            probes.start(lambda: None)
            micro(exe, "getppid", 1, sandbox)
            while not probes.queue.drain():
                time.sleep(0.001)
            first_event_s = time.monotonic() - t_start
            probes.close()

            # 1: host overhead, alternating rounds without and with probes
            progress(f"host overhead, {ROUNDS} rounds each way")
            base: dict[str, list[float]] = {op: [] for op in HOST_OPS}
            loaded: dict[str, list[float]] = {op: [] for op in HOST_OPS}
            for r in range(ROUNDS):
                for op, v in host_costs(exe).items():
                    base[op].append(v)
                p = Probes(ProbeConfig(), features)
                p.trace_cgroup(sandbox.path, 0)
                p.start(lambda: None)
                for op, v in host_costs(exe).items():
                    loaded[op].append(v)
                p.close()
                progress(f"round {r + 1}/{ROUNDS} done")
            for op in HOST_OPS:
                b, w = statistics.median(base[op]), statistics.median(loaded[op])
                rows.append((f"host {op} (ns/call)", f"{b:.0f}", f"{w:.0f}", f"{w / b:.3f}x"))

            # 2 and 3: throughput and latency through decode + assemble
            probes = Probes(ProbeConfig(), features)
            probes.trace_cgroup(sandbox.path, 0)
            asm = Assembler([Scope(sandbox.name, ["/"])], lambda _i: "", lambda _p: "")
            probes.start(lambda: None)

            def pump(latencies: list[int] | None = None) -> int:
                events, errors = asm.feed_batches(probes.queue.drain())
                now = time.monotonic_ns()
                if errors:
                    raise RuntimeError(f"undecodable records: {errors[:3]}")
                connects = [e for e in events if isinstance(e, ConnectEvent)]
                if latencies is not None:
                    latencies.extend(now - e.mono_ns for e in connects)
                return len(connects)

            flood = 1_000_000
            progress(f"throughput: sandboxed flood of {flood} UDP connects")
            before = probes.losses().kernel.get(R.REC_CONNECT, 0)
            proc = subprocess.Popen(
                [str(exe), "connect", str(flood)],
                stdout=subprocess.DEVNULL,
                preexec_fn=sandbox.join,  # noqa: PLW1509 - joins the cgroup before exec
            )
            t0 = time.monotonic()
            delivered = 0
            while proc.poll() is None:
                delivered += pump()
                time.sleep(0.0005)
            probes.drain_now()
            delivered += pump()
            elapsed = time.monotonic() - t0
            lost = probes.losses().kernel.get(R.REC_CONNECT, 0) - before
            rows.append(
                (
                    "flood delivered decoded (events/s)",
                    "",
                    f"{delivered / elapsed:,.0f}",
                    f"lost {lost} of {flood}",
                )
            )
            probes.close()

            probes = Probes(ProbeConfig(), features)
            probes.trace_cgroup(sandbox.path, 0)
            probes.start(lambda: None)
            progress("latency: 1,000 connects per second for 3 s")
            lat: list[int] = []
            proc = subprocess.Popen(
                [str(exe), "connect-every-ms", "3000"],
                stdout=subprocess.DEVNULL,
                preexec_fn=sandbox.join,  # noqa: PLW1509 - joins the cgroup before exec
            )
            while proc.poll() is None:
                pump(lat)
                time.sleep(0.0005)
            probes.drain_now()
            pump(lat)
            lat.sort()
            p50 = lat[len(lat) // 2] / 1e6
            p99 = lat[int(len(lat) * 0.99)] / 1e6
            rows.append(("syscall->decoded latency p50 (ms)", "", f"{p50:.2f}", f"n={len(lat)}"))
            rows.append(("syscall->decoded latency p99 (ms)", "", f"{p99:.2f}", "target < 10"))
            rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append(("collector max RSS (MB)", "", f"{rss_mb:.0f}", "target < 150"))
            rows.append(("start to first event (s)", "", f"{first_event_s:.2f}", "target < 3"))
            probes.close()
        finally:
            sandbox.destroy()

    cmd = "sudo make bench  (" + shlex.join([sys.executable, "-m", "bench"]) + ")"
    print(
        f"\nsandtrace benchmark, kernel {features.release}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"command: {cmd}\n")
    print(f"| {'measure':<38} | {'without':>9} | {'with':>11} | {'ratio / note':<22} |")
    print(f"|{'-' * 40}|{'-' * 11}|{'-' * 13}|{'-' * 24}|")
    for name, without, with_, note in rows:
        print(f"| {name:<38} | {without:>9} | {with_:>11} | {note:<22} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
