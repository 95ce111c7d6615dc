"""Response latency: from a miner's exec in a sandbox to the process killed.

A real `sandtrace watch --cgroup SANDBOX --kill-on high` (embedded detection), then a real
`sandtrace serve --kill-on high` with a real `watch --server ... --kill-on high` (the
service's order rides back in the batch's acknowledgement), each traces a sandbox in which
a copy of sleep named xmrig (the built-in rule "Known Cryptominer Executable", level high)
is started again and again. Measured per run: from just before fork+exec (so an upper bound
by the fork's cost, about a millisecond) to the process reaped after its SIGKILL
(waitpid), p50 and p99 over the runs. Targets: p99 under 50 ms embedded, under 250 ms
through the service.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import Row, standalone
from bench.service import free_port
from collector import cgroups

RUNS = 40
ROOT_DIR = Path(__file__).resolve().parent.parent


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _start(args: list[str], ready: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandtrace", *args],
        cwd=ROOT_DIR,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.stderr is None:
        raise RuntimeError("started without a pipe")
    seen = ""
    while ready not in seen:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            raise RuntimeError(f"sandtrace {args[0]} ended before {ready!r}: {seen[-2000:]}")
        seen += line
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # never a full pipe
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kills(miner: Path, sandbox: cgroups.SandboxCgroup, runs: int) -> tuple[list[float], int]:
    """Latencies (ms) of the runs whose miner was killed, and the runs it was not."""
    got: list[float] = []
    missed = 0
    for _ in range(runs):
        t0 = time.monotonic_ns()
        proc = subprocess.Popen([str(miner), "30"], preexec_fn=sandbox.join)  # noqa: PLW1509
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            missed += 1
            continue
        t1 = time.monotonic_ns()
        if code == -signal.SIGKILL:
            got.append((t1 - t0) / 1e6)
        else:
            missed += 1
        time.sleep(0.05)  # the next run's exec in its own batch
    return got, missed


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _rows(name: str, latencies: list[float], missed: int, target_ms: int) -> list[Row]:
    if not latencies:
        return [(f"response: exec -> killed, {name}", "-", "-", f"no kill in {missed} runs")]
    p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
    verdict = "meets" if p99 < target_ms else "MISSES"
    return [
        (
            f"response: exec -> killed, {name}, p50",
            "-",
            f"{p50:.1f} ms",
            f"{len(latencies)} runs, {missed} missed",
        ),
        (
            f"response: exec -> killed, {name}, p99",
            "-",
            f"{p99:.1f} ms",
            f"{verdict} target < {target_ms} ms",
        ),
    ]


def response_latency(sandbox: cgroups.SandboxCgroup, runs: int = RUNS) -> list[Row]:
    root = cgroups.find_cgroup2_root()
    rel = "/" + str(sandbox.path.relative_to(root))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        miner = Path(tmp) / "xmrig"
        shutil.copy("/bin/sleep", miner)
        progress(f"response: {runs} miners killed by an embedded watch --kill-on high")
        watch = _start(
            ["watch", "--no-tail", "--json", "--cgroup", rel, "--kill-on", "high"], "watching"
        )
        try:
            latencies, missed = _kills(miner, sandbox, runs)
        finally:
            _stop(watch)
        rows += _rows("embedded", latencies, missed, 50)
        progress(f"response: {runs} miners killed on the service's orders")
        port = free_port()
        serve = _start(
            ["serve", "--listen", f"127.0.0.1:{port}", "--kill-on", "high"], "serving on"
        )
        try:
            watch = _start(
                [
                    "watch",
                    "--no-tail",
                    "--no-spool",
                    "--json",
                    "--cgroup",
                    rel,
                    "--server",
                    f"http://127.0.0.1:{port}",
                    "--kill-on",
                    "high",
                ],
                "watching",
            )
            try:
                latencies, missed = _kills(miner, sandbox, runs)
            finally:
                _stop(watch)
        finally:
            _stop(serve)
        rows += _rows("through the service", latencies, missed, 250)
    return rows


if __name__ == "__main__":
    sys.exit(standalone("bench.response", "response", response_latency))
