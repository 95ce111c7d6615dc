"""The fleet on NATS JetStream: worker throughput and the time from an event to its alert.

Throughput: a real 3-node JetStream cluster on loopback (streams with 3 replicas, as the
README's layout runs them) is loaded with batches of 500 events of the engine bench's mix
(bench/service.py) for 16 hosts before any worker starts; then one, or two, real
`sandtrace serve --nats` workers (built-in rule pack) drain it. The figures are the events
handled per wall-clock second from the workers being ready to the last batch handled, and
per second of the workers' own CPU time. On this 2-CPU machine the three NATS servers and
the workers share the CPUs, so the wall-clock figure is a floor; the CPU figure is what a
worker costs.

Latency: one collector process (collector/natsstream.py, its default 0.05 s linger) emits an
event that the test rule alerts on every 20 ms; the alert is read back from the alert
stream, and the figure is its arrival minus the event's own time stamp (the collector's
clock when it made the event: kernel to collector is measured by the latency row of
`python -m bench --only throughput`).

Runnable alone: `python -m bench.fleet` (no root needed).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec.structs

from api.events import Alert, decode
from api.wire import encode_batch
from bench import Row, print_table
from bench.service import BATCH_EVENTS, mix
from fleet import names
from fleet.streams import FleetSettings, ensure
from tests.e2e.fleet import Proc, cleaning, event, start_worker, write_config
from tests.e2e.natscluster import nats_cluster

HOSTS = 16
PARTITIONS = 16


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in USER_HZ ticks


def _handled(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        page = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("sandtrace_fleet_events_total{")
    )


async def _preload(url: str, batches: int) -> int:
    """Make the streams and store `batches` batches over HOSTS hosts; the events stored."""
    import nats  # noqa: PLC0415

    nc = await nats.connect(url.split(","))
    try:
        js = nc.jetstream(timeout=30)
        settings = FleetSettings(partitions=PARTITIONS)  # as the workers have it
        await ensure(js, settings)
        bodies = []
        for h in range(HOSTS):
            events = mix(h * BATCH_EVENTS, BATCH_EVENTS)
            events = [msgspec.structs.replace(e, host=f"bench-host-{h}") for e in events]
            bodies.append(events)
        pending = []
        for i in range(batches):
            h = i % HOSTS
            body = encode_batch(f"bench-{h}", i // HOSTS, bodies[h])
            pending.append(
                await js.publish_async(
                    names.events_subject(f"bench-host-{h}"),
                    body,
                    headers={names.MSG_ID_HEADER: names.batch_msg_id(f"bench-{h}", i // HOSTS)},
                )
            )
            if len(pending) >= 200:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        return batches * BATCH_EVENTS
    finally:
        await nc.close()


def bench_config(directory: Path, builtin: bool) -> Path:
    """The tests' configuration with the default lease (10 s) and no SIEM events; with the
    built-in pack or the tests' one rule."""
    config = write_config(directory, f"partitions = {PARTITIONS}\nreplicas = 3")
    text = config.read_text().replace(
        "builtin_rules = false", f"builtin_rules = {str(builtin).lower()}"
    )
    text = text.replace("lease_seconds = 2", "lease_seconds = 10").replace("ack_wait = 10", "")
    config.write_text(text.replace('siem_events = ["native"]', "siem_events = []"))
    return config


def drain(workers: int, batches: int, tmp: Path) -> tuple[float, float]:
    """(events/s, events per worker CPU-second) for `workers` workers draining the stream."""
    config = bench_config(tmp / f"w{workers}", builtin=True)
    with nats_cluster() as cluster, cleaning([]) as procs:
        total = asyncio.run(_preload(cluster.url, batches))
        started: list[tuple[Proc, int]] = []
        for i in range(workers):
            worker, port = start_worker(cluster.url, config, f"bench-w{i}")
            procs.append(worker)
            started.append((worker, port))
        cpu0 = sum(_cpu_seconds(w.proc.pid) for w, _ in started)
        t0 = time.monotonic()
        while sum(_handled(p) for _, p in started) < total:
            if time.monotonic() - t0 > 600:
                raise RuntimeError("workers did not drain the stream in 600 s")
            time.sleep(0.1)
        wall = time.monotonic() - t0
        cpu = sum(_cpu_seconds(w.proc.pid) for w, _ in started) - cpu0
    return total / wall, total / cpu


async def _latency(url: str, seconds: float) -> tuple[list[float], int]:
    import nats  # noqa: PLC0415
    from nats.js.api import DeliverPolicy  # noqa: PLC0415

    from collector.natsstream import NatsStreamSink  # noqa: PLC0415

    delays: list[float] = []
    raised: list[float] = []  # of which the event to the engine's alert
    nc = await nats.connect(url.split(","))
    js = nc.jetstream()

    async def on_alert(msg: Any) -> None:
        alert = decode(msg.data)
        if isinstance(alert, Alert):
            delays.append((time.time_ns() - alert.time_ns) / 1e6)
            raised.append((alert.raised_ns - alert.time_ns) / 1e6)

    await js.subscribe(
        f"{names.ALERTS_PREFIX}.*",
        stream=names.ALERTS_STREAM,
        cb=on_alert,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    sink = NatsStreamSink(url, host="latency-node", collector_id="bench-latency")
    n = 0
    # until the worker has made the partition's consumer and handles batches as they come
    deadline = time.monotonic() + 60
    while not delays and time.monotonic() < deadline:
        sink.emit(event("latency-node", n, True))
        n += 1
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)
    delays.clear()
    raised.clear()
    first = n
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sink.emit(event("latency-node", n, True))
        n += 1
        await asyncio.sleep(0.02)
    await sink.aclose(10)
    await asyncio.sleep(5)
    await nc.close()
    progress(f"latency: {len(delays)} alerts of {n - first} events")
    raised.sort()
    if raised:
        progress(
            f"event -> the worker's alert: p50 {statistics.median(raised):.1f} ms, "
            f"p99 {raised[int(len(raised) * 0.99)]:.1f} ms"
        )
    return delays, n - first


def latency(seconds: float, tmp: Path) -> tuple[list[float], int]:
    config = bench_config(tmp / "latency", builtin=False)
    with nats_cluster() as cluster, cleaning([]) as procs:
        worker, _port = start_worker(cluster.url, config, "bench-latency")
        procs.append(worker)
        return asyncio.run(_latency(cluster.url, seconds))


def fleet_rows(batches: int = 800, seconds: float = 20.0) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for workers in (1, 2):
            rate, per_cpu = drain(workers, batches, tmp)
            progress(f"fleet, {workers} worker(s): {rate:,.0f} events/s, {per_cpu:,.0f} per CPU-s")
            rows.append(
                (
                    f"fleet, {workers} worker{'s' if workers > 1 else ''} (events/s)",
                    "",
                    f"{rate:,.0f}",
                    f"{per_cpu:,.0f} per worker CPU-s",
                )
            )
        delays, sent = latency(seconds, tmp)
    if delays:
        delays.sort()
        p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
        rows.append(
            (
                "fleet, event -> alert via NATS p99 (ms)",
                "",
                f"{p99:.1f}",
                f"p50 {statistics.median(delays):.1f}; {len(delays)}/{sent}; <200",
            )
        )
    return rows


def main() -> int:
    print_table(fleet_rows())
    return 0


if __name__ == "__main__":
    sys.exit(main())
