"""Detection-service ingest throughput: a real `sandtrace serve` on one core, fed by several
collector-like client processes on the other, through the full built-in rule pack.

Each client posts pre-encoded batches of 500 events (collector/stream.py's default batch
size), built from the rule pack's own test cases as the engine bench's mix is (nine benign
near-misses to one hostile event), with its own collector id and host and increasing
sequence numbers, back to back over one keep-alive connection. The figure is the growth of
the service's `sandtrace_events_received_total` over a measured window, per wall-clock
second and per second of the service's own CPU time; msgpack and JSON alternate in fresh
service processes so each round starts alike.

Also runnable alone, as root or not: `python -m bench.service [--rounds N] [--seconds S]`.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgpack
import msgspec.structs

from api.events import AnyEvent, ExecEvent
from api.render import json_line
from api.wire import BATCH_VERSION, encode_batch
from bench import Row, print_table
from detect.testing import load_cases

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RULES = ROOT / "rules"
SANDTRACE = ROOT / ".venv" / "bin" / "sandtrace"
BATCH_EVENTS = 500
VARIANTS = 8  # distinct event arrays per client, cycled
FORMATS = {"msgpack": "application/msgpack", "json": "application/json"}


def progress(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


@functools.cache
def pack_events() -> tuple[list[AnyEvent], list[AnyEvent]]:
    """The rule pack's case events: (hostile, benign)."""
    cases = [c for f in sorted((RULES / "tests").glob("*.yml")) for c in load_cases(f)]
    return [e for c in cases if c.fire for e in c.events], [
        e for c in cases if not c.fire for e in c.events
    ]


def mix(offset: int, count: int) -> list[AnyEvent]:
    """`count` events of the engine bench's recorded mix, starting at `offset`.

    Every exec event carries a process of its own, as a real one does (the process has just
    taken a new image): the cases' processes differ in their tid, so a batch's process
    table (service/wire.py) saves nothing on them. Connects, binds and listens share their
    case's process, as one process's burst of them does. Process keys stay the cases', so
    repeats fold as in the engine bench."""
    hostile, benign = pack_events()
    events = []
    for i in range(offset, offset + count):
        event = benign[i % len(benign)] if i % 10 else hostile[i % len(hostile)]
        if type(event) is ExecEvent:
            process = msgspec.structs.replace(event.process, tid=_EXEC_TIDS + i)
            event = msgspec.structs.replace(event, process=process)
        events.append(event)
    return events


_EXEC_TIDS = 1 << 30  # above the cases' own, so that no exec's process equals another's


def encoded_events(events: list[AnyEvent], fmt: str) -> bytes:
    """What follows the header of a batch of `events` (encoded once; batch_body() puts a
    header before it): the same bytes as encode_batch's."""
    if fmt == "json":
        return ("[" + ",".join(map(json_line, events)) + "]").encode()
    head = msgpack.packb(_head("", 0, fmt), use_bin_type=True)
    whole = encode_batch("", 0, events)
    if whole[1 : len(head)] != head[1:]:
        raise AssertionError("encode_batch no longer starts with the header")
    return whole[len(head) :]


def _head(collector: str, seq: int, fmt: str) -> dict[str, Any]:
    return {"v": 1 if fmt == "json" else BATCH_VERSION, "collector": collector, "seq": seq}


def batch_body(collector: str, seq: int, events: bytes, fmt: str) -> bytes:
    """The same bytes as api.wire.encode_batch, from events already encoded."""
    head = _head(collector, seq, fmt)
    if fmt == "json":
        return json.dumps(head)[:-1].encode() + b', "events": ' + events + b"}"
    packed: bytes = msgpack.packb(head, use_bin_type=True)
    # a fixmap of three entries becomes one of five: processes and events follow
    return bytes([packed[0] + 2]) + packed[1:] + events


def client(argv: list[str]) -> int:
    """One collector: build the batches, say "ready", wait for a line on stdin, then post
    until the deadline it names; print what was acknowledged as JSON."""
    p = argparse.ArgumentParser(prog="python -m bench.service client")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--fmt", choices=list(FORMATS), required=True)
    args = p.parse_args(argv)
    collector, host = f"bench-collector-{args.id}", f"bench-host-{args.id}"
    bodies = []
    for v in range(VARIANTS):
        events = mix((args.id * VARIANTS + v) * BATCH_EVENTS, BATCH_EVENTS)
        events = [msgspec.structs.replace(e, host=host) for e in events]
        bodies.append(encoded_events(events, args.fmt))
    headers = {"Content-Type": FORMATS[args.fmt], "Authorization": f"Bearer {args.token}"}
    print("ready", flush=True)
    deadline = float(sys.stdin.readline())
    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=60)
    seq = acked = errors = 0
    while time.time() < deadline:
        body = batch_body(collector, seq, bodies[seq % VARIANTS], args.fmt)
        conn.request("POST", "/v1/batches", body, headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            acked += BATCH_EVENTS
        else:
            errors += 1
        seq += 1
    conn.close()
    print(json.dumps({"acked": acked, "batches": seq, "errors": errors}), flush=True)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def received(port: int) -> int:
    """sandtrace_events_received_total, summed over hosts."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("sandtrace_events_received_total{")
    )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(fmt: str, clients: int, seconds: float, tmp: Path) -> tuple[float, float, int]:
    """(events/s, events per service CPU-second, client errors) for one fresh service."""
    port, token = free_port(), "bench-token"
    token_file = tmp / "token"
    token_file.write_text(token)
    serve = subprocess.Popen(
        [
            "taskset",
            "-c",
            "1",
            str(SANDTRACE),
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--token-file",
            str(token_file),
            "--egress-allow",
            "0.0.0.0/0",
            "--egress-allow",
            "::/0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).close()
                break
            except OSError:
                if serve.poll() is not None:
                    why = serve.stderr.read() if serve.stderr else b""
                    raise RuntimeError(f"sandtrace serve exited: {why!r}") from None
                time.sleep(0.1)
        for i in range(clients):
            procs.append(
                subprocess.Popen(
                    [
                        "taskset",
                        "-c",
                        "0",
                        sys.executable,
                        "-m",
                        "bench.service",
                        "client",
                        "--port",
                        str(port),
                        "--token",
                        token,
                        "--id",
                        str(i),
                        "--fmt",
                        fmt,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=ROOT,
                )
            )
        for proc in procs:
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a bench client did not start")
        warmup = 1.0
        deadline = time.time() + warmup + seconds + 1.0
        for proc in procs:
            proc.stdin.write(f"{deadline}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        time.sleep(warmup)
        n0, c0, t0 = received(port), cpu_seconds(serve.pid), time.monotonic()
        time.sleep(seconds)
        n1, c1, t1 = received(port), cpu_seconds(serve.pid), time.monotonic()
        errors = 0
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            errors += json.loads(out.strip().splitlines()[-1])["errors"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        serve.terminate()
        serve.wait(timeout=30)
        if serve.stderr is not None:
            serve.stderr.close()
    return (n1 - n0) / (t1 - t0), (n1 - n0) / max(c1 - c0, 1e-9), errors


def service_ingest(rounds: int = 3, seconds: float = 5.0, clients: int = 4) -> list[Row]:
    results: dict[str, list[tuple[float, float, int]]] = {fmt: [] for fmt in FORMATS}
    with tempfile.TemporaryDirectory() as tmpdir:
        for r in range(rounds):
            for fmt in FORMATS:
                one = one_round(fmt, clients, seconds, Path(tmpdir))
                results[fmt].append(one)
                progress(
                    f"service ingest, {fmt}, round {r + 1}/{rounds}: {one[0]:,.0f} events/s, "
                    f"{one[1]:,.0f} per service CPU-second, {one[2]} errors"
                )
    rows: list[Row] = []
    for fmt, res in results.items():
        rates = [x[0] for x in res]
        per_cpu = [x[1] for x in res]
        errors = sum(x[2] for x in res)
        rows.append(
            (
                f"service, {fmt}, {clients} collectors (events/s)",
                "",
                f"{max(rates):,.0f}",
                f"median {statistics.median(rates):,.0f}; target >= 50,000",
            )
        )
        rows.append(
            (
                f"service, {fmt}, per service CPU-second",
                "",
                f"{max(per_cpu):,.0f}",
                f"median {statistics.median(per_cpu):,.0f}; {errors} errors",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["client"]:
        return client(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m bench.service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds per format (best and median)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per round")
    p.add_argument("--clients", type=int, default=4, help="collector processes")
    args = p.parse_args(argv)
    rows = service_ingest(args.rounds, args.seconds, args.clients)
    print(f"\ncommand: {shlex.join(['.venv/bin/python', '-m', 'bench.service', *argv])}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
