"""Instructions per event, counted by valgrind's callgrind: a figure that does not move with
the machine's load, for comparing two versions of the engine and the service's ingest path.

Wall-clock rates on a shared 2-core VM vary by half from one run to the next; instruction
counts repeat to a tenth of a percent. Each target runs in its own process under
`valgrind --tool=callgrind --instr-atstart=no`; the process warms up (rules compiled, every
event seen once), switches counting on with callgrind_control, runs the measured loop, and
switches it off, so imports, rule loading and compilation are not counted.

    python -m bench.instructions                  # every target
    python -m bench.instructions --only service   # targets whose name contains "service"

Targets: the engine (Engine.feed, built-in pack, egress allow-list on) per event kind; the
service's in-process path (decode_batch on 500-event msgpack batches, then Ingest.handle);
and the whole service over HTTP (its aiohttp application on a local port, posted to by a
client process that valgrind does not trace), on the mix bench/service.py sends. Needs
valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import Row, print_table

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("ExecEvent", "ConnectEvent", "BindEvent", "ListenEvent")
TARGETS = (*(f"engine:{k}" for k in KINDS), "engine:mix", "service", "service:http")
EVENTS = 2000  # events of the mix each target draws from
PASSES = 2  # measured passes over them


def _counting(on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(os.getpid())],
        check=True,
        capture_output=True,
    )


def child(target: str) -> None:
    """Runs under callgrind: warm up, count PASSES passes, print how many events they fed."""
    import msgspec.structs  # noqa: PLC0415

    from api.wire import decode_batch  # noqa: PLC0415
    from bench.service import batch_body, encoded_events, mix  # noqa: PLC0415
    from detect.egress import EgressPolicies  # noqa: PLC0415
    from detect.engine import Engine  # noqa: PLC0415
    from detect.loader import load_paths  # noqa: PLC0415
    from service.app import Ingest  # noqa: PLC0415

    rules = load_paths([ROOT / "rules"])
    egress = EgressPolicies.parse(["0.0.0.0/0", "::/0"])
    events = mix(0, EVENTS)
    if target == "service:http":
        ingest = Ingest(rules, engine_factory=lambda r: Engine(r, egress))
        print(f"events {asyncio.run(_over_http(ingest))}")
        return
    if target == "service":
        hosts = [
            [msgspec.structs.replace(e, host=f"host-{i}") for e in events[i::4]] for i in range(4)
        ]
        bodies = [encoded_events(batch, "msgpack") for batch in hosts]
        ingest = Ingest(rules, engine_factory=lambda r: Engine(r, egress))
        seq = 0

        def once() -> int:
            nonlocal seq
            n = 0
            for i, body in enumerate(bodies):
                seq += 1
                collector, s, batch = decode_batch(batch_body(f"c{i}", seq, body, "msgpack"))
                ingest.handle(collector, s, batch)
                n += len(batch)
            return n
    else:
        kind = target.partition(":")[2]
        chosen = events if kind == "mix" else [e for e in events if type(e).__name__ == kind]
        feed = Engine(rules, egress).feed

        def once() -> int:
            for e in chosen:
                feed(e)
            return len(chosen)

    once()
    gc.collect()
    gc.freeze()
    _counting(True)
    n = sum(once() for _ in range(PASSES))
    _counting(False)
    print(f"events {n}")


async def _over_http(ingest: object) -> int:
    """Serve the service's application on a local port; a client process posts the batches
    (warm-up first, then the counted ones). The events counted."""
    from aiohttp import web  # noqa: PLC0415

    from service.app import make_app  # noqa: PLC0415

    runner = web.AppRunner(make_app(ingest, None))  # type: ignore[arg-type]
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.instructions",
        "--client",
        str(port),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    if client.stdin is None or client.stdout is None:
        raise RuntimeError("the client process has no pipes")
    await client.stdout.readline()  # warmed up
    gc.collect()
    gc.freeze()
    _counting(True)
    client.stdin.write(b"go\n")
    await client.stdin.drain()
    events = int((await client.stdout.readline()).decode())
    _counting(False)
    await client.wait()
    await runner.cleanup()
    return events


def client(port: int) -> None:
    """Posts to the service under count (not traced itself): the mix, 500-event batches."""
    import http.client  # noqa: PLC0415

    from bench.service import batch_body, encoded_events, mix  # noqa: PLC0415

    events = mix(0, EVENTS)
    bodies = [encoded_events(events[i : i + 500], "msgpack") for i in range(0, EVENTS, 500)]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    seq = 0

    def post_all() -> int:
        nonlocal seq
        for body in bodies:
            conn.request(
                "POST",
                "/v1/batches",
                batch_body("c", seq, body, "msgpack"),
                {"Content-Type": "application/msgpack"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"service answered {resp.status}")
            seq += 1
        return len(events)

    post_all()
    print("warm", flush=True)
    sys.stdin.readline()
    print(sum(post_all() for _ in range(PASSES)), flush=True)


def measure(target: str) -> tuple[int, int]:
    """(instructions, events) of one target, each in its own callgrind run."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/out",
            sys.executable,
            "-m",
            "bench.instructions",
            "--child",
            target,
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    collected = re.search(r"Collected : (\d+)", done.stderr)
    events = re.search(r"^events (\d+)$", done.stdout, re.M)
    if done.returncode != 0 or not collected or not events:
        raise RuntimeError(f"{target}: callgrind run failed:\n{done.stderr[-2000:]}")
    return int(collected.group(1)), int(events.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.instructions",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--only", default="", help="targets whose name contains this")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--client", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        client(args.client)
        return 0
    if args.child:
        child(args.child)
        return 0
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        print(f"bench: {', '.join(missing)} not found: apt-get install valgrind", file=sys.stderr)
        return 2
    rows: list[Row] = []
    for target in (t for t in TARGETS if args.only in t):
        print(f"bench: counting {target} under callgrind (about 15 s)", file=sys.stderr, flush=True)
        instructions, events = measure(target)
        rows.append(
            (
                f"instructions/event, {target}",
                "",
                f"{instructions // events:,}",
                f"{events:,} events, callgrind",
            )
        )
    given = sys.argv[1:] if argv is None else argv
    print(f"\ncommand: {shlex.join(['.venv/bin/python', '-m', 'bench.instructions', *given])}\n")
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
