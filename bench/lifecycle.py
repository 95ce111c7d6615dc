"""What each short process costs the collector: a real `sandtrace watch` tracing a sandbox
where a loop forks and execs /bin/true at a fixed rate.

For each rate, the collector's CPU time (utime + stime of the `watch` process, all its
threads, from /proc/PID/stat) over the run, as a share of one core and as a ratio to the CPU
time the traced loop and its children spent (the loop's own utime + stime + cutime +
cstime, read from /proc/PID/stat while it is a zombie, before it is reaped). Every run
counts its events: `watch` prints its totals when it stops, and a fork+exec loop of n makes
exactly n forks, n + 1 execs and n + 1 exits (the loop's own exec and exit included).

`python -m bench --only lifecycle` runs it with the other parts' table; `python -m
bench.lifecycle` runs it alone (`--help` for the rates, rounds and variants).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench import Row, standalone
from collector import cgroups

HERE = Path(__file__).resolve().parent
IDLE_SECONDS = 30.0
SECONDS_PER_RUN = 10.0
MAX_RATE_COUNT = 20_000  # execs of the unpaced run

# The workload: n fork+exec of /bin/true, paced at `rate` per second from absolute
# deadlines (0: as fast as it goes), at most 16 children at once. It sleeps between forks,
# so that its CPU time is the work itself; it prints the rate it achieved and how many
# children failed.
LOOP_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define INFLIGHT 16

static long failed;

static void reap(long *running, int block)
{
	int status;
	pid_t p;

	while (*running > 0 && (p = waitpid(-1, &status, block ? 0 : WNOHANG)) > 0) {
		(*running)--;
		if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
		block = 0;
	}
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 0;
	double rate = argc > 2 ? atof(argv[2]) : 0;
	long running = 0;
	struct timespec start, at, end;

	clock_gettime(CLOCK_MONOTONIC, &start);
	for (long i = 0; i < n; i++) {
		if (rate > 0) {
			double t = start.tv_sec + start.tv_nsec / 1e9 + i / rate;

			at.tv_sec = (time_t)t;
			at.tv_nsec = (long)((t - (double)at.tv_sec) * 1e9);
			while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR)
				;
		}
		reap(&running, running >= INFLIGHT);
		pid_t p = fork();

		if (p == 0) {
			execl("/bin/true", "true", (char *)NULL);
			_exit(127);
		}
		if (p < 0) {
			reap(&running, 1);
			i--;
			continue;
		}
		running++;
	}
	while (running > 0)
		reap(&running, 1);
	clock_gettime(CLOCK_MONOTONIC, &end);
	double seconds = end.tv_sec - start.tv_sec + (end.tv_nsec - start.tv_nsec) / 1e9;

	printf("%.1f %ld\n", n / seconds, failed);
	return 0;
}
"""


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """cpu_ticks() in seconds."""
    return cpu_ticks(pid, children=children) / os.sysconf("SC_CLK_TCK")


def compiled_loop(directory: Path) -> Path:
    """The workload (LOOP_C), compiled into `directory`."""
    source, loop = directory / "forkexec.c", directory / "forkexec"
    source.write_text(LOOP_C)
    subprocess.run(["cc", "-O2", "-o", str(loop), str(source)], check=True)
    return loop


def cpu_ticks(pid: int, *, children: bool = False) -> int:
    """utime + stime of process pid (all its threads), in clock ticks; with children, also
    cutime + cstime (its reaped children's)."""
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    fields = stat[stat.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14 to 17
    return sum(int(f) for f in fields[11 : 15 if children else 13])


@dataclass(slots=True)
class LoopRun:
    """One run of the loop: what it asked and achieved, and who spent how much CPU."""

    rate: int  # asked, 0 for as fast as it goes
    execs: int
    achieved: float  # execs per second
    seconds: float  # wall time of the collector's share (the loop's, plus its drain)
    loop_cpu: float  # seconds: the loop and its children
    watch_cpu: float  # seconds: the collector

    @property
    def ratio(self) -> float:
        return self.watch_cpu / self.loop_cpu if self.loop_cpu else float("inf")

    @property
    def watch_share(self) -> float:
        return self.watch_cpu / self.seconds

    @property
    def loop_share(self) -> float:
        return self.loop_cpu / self.seconds


@dataclass(slots=True)
class Watch:
    """A running `sandtrace watch` and what it printed on stderr."""

    proc: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)


@contextmanager
def watching(sandbox: cgroups.SandboxCgroup, *flags: str) -> Iterator[Watch]:
    """A real `sandtrace watch --cgroup <sandbox> <flags>` (its stdout to /dev/null, its
    live tail on a socket of its own), from its "watching" line until it is stopped."""
    with tempfile.TemporaryDirectory() as tmp:
        # SANDTRACE_BENCH_PROFILE=FILE: the event loop's thread under cProfile, stats to FILE
        profile = os.environ.get("SANDTRACE_BENCH_PROFILE")
        profiler = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen(
            [
                sys.executable,
                *profiler,
                "-m",
                "sandtrace",
                "watch",
                "--cgroup",
                str(sandbox.path),
                "--tail-socket",
                str(Path(tmp) / "tail.sock"),
                *flags,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=HERE.parent,
        )
        watch = Watch(proc)
        if proc.stderr is None:
            raise RuntimeError("watch was started without a pipe")
        stderr = proc.stderr
        reader = threading.Thread(target=lambda: watch.stderr.extend(stderr), daemon=True)
        try:
            while not any("watching" in line for line in watch.stderr):
                line = proc.stderr.readline()
                if not line:
                    raise RuntimeError(f"watch ended before it started: {''.join(watch.stderr)}")
                watch.stderr.append(line)
            reader.start()
            yield watch
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            if reader.is_alive():
                reader.join(timeout=10)


def totals(watch: Watch) -> dict[str, int]:
    """The event counts of watch's totals line ("events: exec=3 ... lost: kernel=0 user=0")."""
    for line in watch.stderr:
        if "events:" in line and "lost:" in line:
            events, lost = line.split("events:", 1)[1].split("lost:", 1)
            out = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", events)}
            out |= {f"lost_{k}": int(v) for k, v in re.findall(r"(\w+)=(\d+)", lost)}
            return out
    raise RuntimeError(f"watch printed no totals: {''.join(watch.stderr)[-2000:]}")


def settle(watch: Watch, quiet_ticks: int = 1, window: float = 0.2, limit: float = 30) -> None:
    """Return once watch spends at most quiet_ticks of CPU in a window: it has caught up."""
    deadline = time.monotonic() + limit
    before = cpu_ticks(watch.proc.pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_ticks(watch.proc.pid)
        if now - before <= quiet_ticks:
            return
        before = now


def run_loop(
    loop: Path, sandbox: cgroups.SandboxCgroup, watch: Watch, rate: int, n: int
) -> LoopRun:
    """n fork+execs at rate per second (0: unpaced) in the sandbox, watched."""
    settle(watch)
    t0 = time.monotonic()
    w0 = watch.cpu()
    proc = subprocess.Popen(
        [str(loop), str(n), str(rate)],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=sandbox.join,  # noqa: PLW1509 - joins the cgroup before exec
    )
    if proc.stdout is None:
        raise RuntimeError("loop started without a pipe")
    out = proc.stdout.read()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie: its stat still holds
    loop_cpu = cpu_seconds(proc.pid, children=True)
    proc.wait()
    settle(watch)
    seconds = time.monotonic() - t0
    watch_cpu = watch.cpu() - w0
    if watch.proc.poll() is not None:
        raise RuntimeError(f"watch ended during the run: {''.join(watch.stderr)[-2000:]}")
    achieved, failed = out.split()
    if int(failed):
        raise RuntimeError(f"{failed} of {n} children of the loop failed")
    return LoopRun(rate, n, float(achieved), seconds, loop_cpu, watch_cpu)


def idle(watch: Watch, seconds: float) -> float:
    """watch's CPU share of a core while nothing happens in its sandbox."""
    settle(watch)
    t0, c0 = time.monotonic(), watch.cpu()
    time.sleep(seconds)
    return (watch.cpu() - c0) / (time.monotonic() - t0)


def check_events(watch: Watch, runs: list[LoopRun]) -> tuple[int, int, int]:
    """(delivered, expected, lost) fork+exec+exit events over runs; raises on a mismatch."""
    got = totals(watch)
    n = sum(r.execs for r in runs)
    loops = len(runs)
    expected = {"fork": n, "exec": n + loops, "exit": n + loops}
    delivered = sum(got.get(k, 0) for k in expected)
    lost = got.get("lost_kernel", 0) + got.get("lost_user", 0)
    if lost or any(got.get(k, 0) != v for k, v in expected.items()):
        raise RuntimeError(f"events: expected {expected}, watch counted {got}")
    return delivered, sum(expected.values()), lost


def _label(run: LoopRun) -> str:
    asked = "unpaced" if run.rate == 0 else f"{run.rate:,}/s"
    return f"{asked}, achieved {run.achieved:,.0f}/s"


def _rows_for(name: str, runs: list[LoopRun]) -> list[Row]:
    """One row per rate: the median round's collector share and ratio, with the range."""
    rows: list[Row] = []
    for rate in dict.fromkeys(r.rate for r in runs):
        same = sorted((r for r in runs if r.rate == rate), key=lambda r: r.ratio)
        mid = same[len(same) // 2]
        spread = f" ({same[0].ratio:.3f}-{same[-1].ratio:.3f})" if len(same) > 1 else ""
        per_exec = mid.watch_cpu / mid.execs * 1e6
        rows.append(
            (
                f"{name}, fork+exec {_label(mid)}: loop | watch CPU",
                f"{100 * mid.loop_share:.1f}%",
                f"{100 * mid.watch_share:.1f}%",
                f"ratio {mid.ratio:.3f}{spread}; {per_exec:.0f} us/exec",
            )
        )
    return rows


def lifecycle(
    sandbox: cgroups.SandboxCgroup,
    *,
    rates: tuple[int, ...] = (100, 1000, 0),
    rounds: int = 3,
    idle_seconds: float = IDLE_SECONDS,
    alerts_only: bool = True,
    text_variant: bool = True,
) -> list[Row]:
    """Rows: watch's idle share of a core, then per rate (0: unpaced) the loop's CPU share
    ("without"), the collector's ("with"), their ratio and the events counted; the same at
    1,000/s with text output of every event (--alerts-only off)."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        loop = compiled_loop(Path(tmp))
        variants: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []
        if alerts_only:
            variants.append(("--alerts-only", ("--alerts-only",), rates))
        if text_variant:
            variants.append(("text", (), (1000,)))
        for name, flags, variant_rates in variants:
            runs: list[LoopRun] = []
            with watching(sandbox, *flags) as watch:
                if name == "--alerts-only" and idle_seconds > 0:
                    share = idle(watch, idle_seconds)
                    progress(f"watch {name} idle: {100 * share:.2f}% of a core")
                    rows.append(
                        (
                            f"watch {name}, idle {idle_seconds:.0f} s: CPU",
                            "",
                            f"{100 * share:.2f}%",
                            "target < 0.5%",
                        )
                    )
                for r in range(rounds):
                    for rate in variant_rates:
                        n = int(rate * SECONDS_PER_RUN) if rate else MAX_RATE_COUNT
                        run = run_loop(loop, sandbox, watch, rate, n)
                        runs.append(run)
                        progress(
                            f"{name} round {r + 1}/{rounds}, {_label(run)}: collector "
                            f"{100 * run.watch_share:.1f}% of a core, loop "
                            f"{100 * run.loop_share:.1f}%, ratio {run.ratio:.3f}, "
                            f"{run.watch_cpu / run.execs * 1e6:.0f} us/exec"
                        )
            delivered, expected, lost = check_events(watch, runs)
            rows += _rows_for(f"watch {name}", runs)
            rows.append(
                (
                    f"watch {name}: fork+exec+exit events delivered",
                    "",
                    f"{delivered:,}",
                    f"of {expected:,} expected; {lost} lost",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__)
    parser.add_argument(
        "--rate",
        type=int,
        action="append",
        help="execs per second, 0 for unpaced; repeatable (default 100, 1000, 0)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="runs of each rate (default 3)")
    parser.add_argument(
        "--idle", type=float, default=IDLE_SECONDS, help="idle seconds measured, 0 for none"
    )
    parser.add_argument("--no-text", action="store_true", help="leave the text variant out")
    parser.add_argument(
        "--text-only", action="store_true", help="only the text variant (at 1,000/s)"
    )
    args = parser.parse_args(argv)
    return standalone(
        "bench.lifecycle",
        "lifecycle",
        lambda sandbox: lifecycle(
            sandbox,
            rates=tuple(args.rate or (100, 1000, 0)),
            rounds=args.rounds,
            idle_seconds=args.idle,
            alerts_only=not args.text_only,
            text_variant=not args.no_text,
        ),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
