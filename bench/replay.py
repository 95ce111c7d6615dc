"""Where the collector's time goes per process, by stage, repeatably: the records of a real
sandboxed fork+exec loop are captured from the probes as the reader hands them over (every
25 ms), then replayed through the collector's own pipeline (the assembler, the exec
enricher, the rule engine with the full pack and the sinks of `watch --alerts-only`), a fresh
pipeline per pass, with the CPU time of each stage taken per process.

Each pass runs twice: back to back (the code warm) and with a 25 ms pause before each
hand-over, as the live collector runs (its code and data go cold between hand-overs; the
difference is the cost of that). `python -m bench.replay` runs it alone (`--help` for the
count and rate); `python -m bench --only lifecycle` runs it after the lifecycle rows.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench import Row, standalone
from bench.lifecycle import compiled_loop
from collector import cgroups
from collector import cli as collector_cli
from collector import records as R
from collector.assemble import Scope
from collector.packages import PackageIndex
from collector.pipeline import Pipeline
from probes import kernel
from probes.loader import ProbeConfig, Probes
from sandtrace.cli import build_parser

PAUSE = 0.025  # the reader's hand-over interval while busy (ProbeConfig.hand_over_interval)
PASSES = 5


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def capture(sandbox: cgroups.SandboxCgroup, execs: int, rate: int) -> list[list[list[bytes]]]:
    """The hand-overs of a loop of `execs` fork+execs of /bin/true at `rate`/s in the
    sandbox: the queue drained every PAUSE seconds, as the collector's pipeline would."""
    probes = Probes(ProbeConfig(), kernel.check())
    handed: list[list[list[bytes]]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loop = compiled_loop(Path(tmp))
            probes.trace_cgroup(sandbox.path, 0)
            probes.start(lambda: None)
            proc = subprocess.Popen(
                [str(loop), str(execs), str(rate)],
                stdout=subprocess.DEVNULL,
                preexec_fn=sandbox.join,  # noqa: PLW1509 - joins the cgroup before exec
            )
            while proc.poll() is None:
                time.sleep(PAUSE)
                if batches := probes.queue.drain():
                    handed.append(batches)
            probes.drain_now()
            if batches := probes.queue.drain():
                handed.append(batches)
    finally:
        probes.close()
    return handed


class _Queue:
    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    def drain(self) -> list[list[bytes]]:
        out, self.batches = self.batches, []
        return out


def _pipeline(packages: PackageIndex) -> tuple[Pipeline, _Queue]:
    """The pipeline `watch --alerts-only` builds, on a source that hands what it is given."""
    args = build_parser().parse_args(["watch", "--alerts-only", "--no-tail"])
    queue = _Queue()
    source = SimpleNamespace(
        classifies_flows=True,
        features=SimpleNamespace(packet_kprobe=True),  # no /proc poller: not per hand-over
        queue=queue,
        collect=queue.drain,
        look_again=lambda: None,
    )
    scope = Scope("/sandtrace/replay", ["/sandtrace/replay"])
    outputs = collector_cli._Outputs.build(args)
    tracing = collector_cli._Tracing(
        args,
        source,  # type: ignore[arg-type]
        cgroups.find_cgroup2_root(),
        [scope],
        packages,
        outputs=outputs,
    )
    return tracing.pipeline, queue


async def _pass(
    handed: list[list[list[bytes]]], pause: float, packages: PackageIndex
) -> tuple[float, float, float]:
    """CPU seconds of (assembly, enrichment, detection and sinks) over the hand-overs (of
    the whole process: the enricher's worker thread, which hashes the one new file, too)."""
    pipeline, _queue = _pipeline(packages)
    gc.freeze()
    clock = time.process_time
    assemble = enrich = emit = 0.0
    for batches in handed:
        if pause:
            await asyncio.sleep(pause)  # the thread idles, as the collector's between reads
        t0 = clock()
        events, _ = pipeline.assembler.feed_batches(batches)
        t1 = clock()
        await pipeline._enrich(events)
        t2 = clock()
        pipeline._emit_events(events)
        t3 = clock()
        assemble, enrich, emit = assemble + t1 - t0, enrich + t2 - t1, emit + t3 - t2
    if pipeline.enricher is not None:
        pipeline.enricher.close()
    return assemble, enrich, emit


def replay(
    sandbox: cgroups.SandboxCgroup, execs: int = 3000, rate: int = 1000, passes: int = PASSES
) -> list[Row]:
    """Rows: the collector's CPU per process by stage, back to back and with pauses."""
    progress(f"replay: capturing {execs:,} fork+execs at {rate:,}/s")
    handed = capture(sandbox, execs, rate)
    records = [R.decode_record(b) for batches in handed for batch in batches for b in batch]
    n = sum(1 for r in records if isinstance(r, R.ExecRecord))
    progress(f"replay: {len(records):,} records ({n:,} execs) in {len(handed)} hand-overs")
    packages = PackageIndex()
    packages.warm()  # built once, before any pass (the collector builds it while compiling)
    rows: list[Row] = []
    for label, pause in (("back to back", 0.0), (f"{PAUSE * 1000:.0f} ms pauses", PAUSE)):
        runs = []
        for i in range(passes):
            runs.append(asyncio.run(_pass(handed, pause, packages)))
            per = sum(runs[-1]) / n * 1e6
            progress(f"replay {label}, pass {i + 1}/{passes}: {per:.1f} us/process")
        a, e, d = min(runs, key=sum)
        rows.append(
            (
                f"collector per process, replayed, {label} (us)",
                "",
                f"{(a + e + d) / n * 1e6:.1f}",
                f"assembly {a / n * 1e6:.1f}, enrichment {e / n * 1e6:.1f}, rules and sinks "
                f"{d / n * 1e6:.1f}; best of {passes}",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--execs", type=int, default=3000, help="fork+execs captured")
    parser.add_argument("--rate", type=int, default=1000, help="execs per second")
    parser.add_argument("--passes", type=int, default=PASSES, help="replays of each kind")
    args = parser.parse_args(argv)
    return standalone(
        "bench.replay",
        "replay",
        lambda sandbox: replay(sandbox, args.execs, args.rate, args.passes),
        argv,
    )


if __name__ == "__main__":
    sys.exit(main())
