"""Parts of a fleet for tests: real `sandtrace serve --nats` workers as subprocesses, and
collector processes that stream synthetic batches through the collector's own NATS sink
(collector/natsstream.py), each event numbered so that a test can check every one.

A synthetic collector (run as `python -m tests.e2e.fleet COLLECTOR-ARGS`) streams `--batches`
batches of `--events` exec events for `--host`; event n of the host has pid 100000 + n,
and every `--hit-every`-th event runs `fleet-hit <host> <n>`, which the test rule
FLEET_RULE alerts on (one alert per hit: the test configuration folds nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from api.events import ExecEvent, Process
from tests.e2e.natscluster import server_port
from tests.serving import ROOT_DIR

FLEET_RULE = """
title: Fleet Test Hit
id: 6d0c1f54-3a43-4b8e-9d59-1f2e50a0c0de
status: test
description: a test marker command ran
author: sandtrace tests
date: 2026-12-06
logsource:
  product: linux
  category: process_creation
detection:
  selection:
    Image|endswith: /fleet-hit
  condition: selection
level: high
"""
FLEET_RULE_ID = "6d0c1f54-3a43-4b8e-9d59-1f2e50a0c0de"
BASE_PID = 100_000


def write_config(directory: Path, extra: str = "", fold_seconds: int = 0) -> Path:
    """A rules directory with FLEET_RULE only, and a service configuration that uses it and
    folds nothing (each hit is its own alert)."""
    rules = directory / "rules"
    rules.mkdir(parents=True, exist_ok=True)
    (rules / "fleet.yml").write_text(FLEET_RULE)
    config = directory / "service.toml"
    config.write_text(
        f"""
[detection]
rules = ["{rules}"]
builtin_rules = false
fold_seconds = {fold_seconds}

[fleet]
lease_seconds = 2
ack_wait = 10
siem_events = ["native"]
{extra}
"""
    )
    return config


@dataclass
class Proc:
    """A subprocess whose stderr is read into `lines` (so it never blocks on the pipe)."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(
                    f"exited ({self.proc.returncode}) before {text!r}:\n{self.log()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.close()

    def close(self) -> None:
        """Once it has exited: the rest of its stderr read, the pipe closed."""
        if self.reader is not None:
            self.reader.join(timeout=10)
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self.proc.stderr.close()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.close()
        return code


def spawn(cmd: list[str], env: dict[str, str] | None = None, stdout: Path | None = None) -> Proc:
    """Start cmd in the checkout (its stdout to the file `stdout`, or nowhere)."""
    sink = stdout.open("w") if stdout is not None else subprocess.DEVNULL
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT_DIR,
        stdout=sink,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if stdout is not None:
        sink.close()  # type: ignore[union-attr]  # the child has its own copy
    handle = Proc(proc)

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            handle.lines.append(line)

    handle.reader = threading.Thread(target=drain, daemon=True)
    handle.reader.start()
    return handle


def serve_nats(url: str, config: Path, *extra: str) -> list[str]:
    """The command line of a fleet worker on the cluster at `url` with `config`."""
    serve = ["serve", "--nats", url, "--config", str(config), *extra]
    return [sys.executable, "-m", "sandtrace", *serve]


def start_worker(
    url: str, config: Path, worker_id: str, *extra: str, env: dict[str, str] | None = None
) -> tuple[Proc, int]:
    """A real worker (`env` added to its environment), returned once it serves; and its
    /metrics port."""
    port = server_port()
    worker = spawn(
        serve_nats(url, config, "--listen", f"127.0.0.1:{port}", "--worker-id", worker_id, *extra),
        env,
    )
    worker.wait_for("serving the fleet")
    return worker, port


def start_collector(url: str, host: str, batches: int, *extra: str) -> Proc:
    return spawn(
        [
            sys.executable,
            "-m",
            "tests.e2e.fleet",
            "--server",
            url,
            "--host",
            host,
            "--batches",
            str(batches),
            *extra,
        ]
    )


@contextlib.contextmanager
def cleaning(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Every process in `procs` (added to while inside) killed at the end, whatever happens."""
    try:
        yield procs
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                p.kill()


# -- the synthetic collector ---------------------------------------------------------------


def event(host: str, n: int, hit: bool, same_process: bool = False) -> ExecEvent:
    pid = BASE_PID + n
    start = n
    if hit and same_process:  # one process that keeps doing it: its repeats fold
        pid, start = BASE_PID - 1, 0
    exe = b"/usr/local/bin/fleet-hit" if hit else b"/usr/bin/true"
    argv = [exe.rsplit(b"/", 1)[1], host.encode(), str(n).encode()]
    process = Process(
        pid=pid,
        tid=pid,
        ns_pid=pid,
        ppid=1,
        uid=0,
        gid=0,
        comm=argv[0][:15],
        start_ns=start,
        key=f"{pid}@{start}",
        exe=exe,
        argv=argv,
    )
    return ExecEvent(
        time_ns=time.time_ns(),
        mono_ns=time.monotonic_ns(),
        host=host,
        sandbox="sb-fleet",
        cgroup_id=1,
        cgroup_path="/sandtrace/sb-fleet",
        container_id="",
        process=process,
        argv=argv,
        filename=exe,
    )


async def _stream(args: argparse.Namespace) -> None:
    from collector.natsstream import NatsStreamSink  # noqa: PLC0415

    sink = NatsStreamSink(
        args.server,
        args.token_file,
        ca_file=args.ca_file,
        host=args.host,
        batch_events=args.events,
        linger=0.05,
        spool_dir=Path(args.spool_dir) if args.spool_dir else None,
        nkey_file=args.nkey_file,
        creds_file=args.creds_file,
    )
    n = 0
    for _ in range(args.batches):
        for _ in range(args.events):
            sink.emit(event(args.host, n, n % args.hit_every == 0, args.same_process))
            n += 1
        await asyncio.sleep(args.pause)
    await sink.aclose(deadline=args.deadline)
    st = sink.stats
    print(
        f"collector {args.host}: sent {st.sent_events} events in {st.sent_batches} batches; "
        f"discarded {st.discarded}; spool {sink.spool_batches}",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    from sandtrace.cli import configure_logging  # noqa: PLC0415

    configure_logging(verbose=False)  # warnings on stderr, as the real collector's
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--events", type=int, default=50)
    p.add_argument("--hit-every", type=int, default=7)
    p.add_argument("--pause", type=float, default=0.02)
    p.add_argument("--deadline", type=float, default=120.0)
    p.add_argument("--spool-dir")
    p.add_argument("--token-file")
    p.add_argument("--ca-file")
    p.add_argument("--nkey-file")
    p.add_argument("--creds-file")
    p.add_argument("--same-process", action="store_true", help="every hit by one process")
    asyncio.run(_stream(p.parse_args()))


if __name__ == "__main__":
    main()
