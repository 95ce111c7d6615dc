"""`sandtrace tail --server` as real processes against a real `sandtrace serve` on loopback:
filters applied by the service, compact and JSON lines, refusals, and reconnection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec.structs
from aiohttp import web

from api.events import WIRE_VERSION, AnyEvent
from api.render import bytes_from_json
from api.wire import CONTENT_TYPE, encode_batch
from detect.testing import T0, event_from_fields
from tests.tlsutil import make_tls
from tests.unit.test_serve_process import free_port, post
from tests.unit.test_service import RULE

ROOT_DIR = Path(__file__).resolve().parents[2]
TOKEN = "t0ken"  # noqa: S105 - a test token


class Lines:
    """The lines a process writes to a pipe, read with a deadline (never blocks a test)."""

    def __init__(self, proc: subprocess.Popen[bytes], stream: str) -> None:
        self.proc = proc
        pipe = getattr(proc, stream)
        assert pipe is not None
        self.fd: int = pipe.fileno()
        self.buf = b""
        self.seen: list[str] = []

    def next(self, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line within {timeout}s; saw {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise AssertionError(f"stream ended; saw {self.seen!r}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        text = line.decode("utf-8", "surrogateescape")
        self.seen.append(text)
        return text

    def until(self, fragment: str, timeout: float = 15.0) -> str:
        while True:
            line = self.next(timeout)
            if fragment in line:
                return line

    def quiet(self, seconds: float) -> bool:
        """True when nothing more is written within seconds."""
        if self.buf:
            return False
        ready, _, _ = select.select([self.fd], [], [], seconds)
        return not ready


def sandtrace(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sandtrace", *args],
        cwd=ROOT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            stop(proc)


def serve(procs: list[subprocess.Popen[bytes]], tmp: Path, port: int, *args: str) -> Lines:
    (tmp / "token").write_text(TOKEN + "\n")
    (tmp / "rule.yml").write_text(RULE)
    proc = sandtrace(
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--token-file",
        str(tmp / "token"),
        "--no-builtin-rules",
        "--rules",
        str(tmp / "rule.yml"),
        *args,
    )
    procs.append(proc)
    err = Lines(proc, "stderr")
    err.until("serving on")
    return err


def tail(
    procs: list[subprocess.Popen[bytes]], tmp: Path, port: int, *args: str, scheme: str = "http"
) -> tuple[Lines, Lines]:
    """A tail process's stdout and stderr, once it follows."""
    proc = sandtrace(
        "tail",
        "--server",
        f"{scheme}://127.0.0.1:{port}",
        "--token-file",
        str(tmp / "token"),
        "--color",
        "never",
        *args,
    )
    procs.append(proc)
    err = Lines(proc, "stderr")
    err.until("following")
    return Lines(proc, "stdout"), err


def miner(pid: int, host: str, sandbox: str) -> AnyEvent:
    event = event_from_fields(
        "process_creation",
        {
            "Image": "/tmp/.x/kworker",
            "ProcessId": pid,
            "Sandbox": sandbox,
            "Argv": ["kworker", "-o", "stratum+tcp://198.51.100.1:3333", "\x1b[2J"],
        },
    )
    return msgspec.structs.replace(event, host=host)


def connect(pid: int, host: str, sandbox: str) -> AnyEvent:
    event = event_from_fields(
        "network_connection", {"ProcessId": pid, "Sandbox": sandbox, "DestinationPort": 3333}
    )
    return msgspec.structs.replace(event, host=host)


def send(port: int, seq: int, events: list[AnyEvent]) -> None:
    url = f"http://127.0.0.1:{port}/v1/batches"
    assert post(url, encode_batch("c1", seq, events), TOKEN) == (200, {"ack": seq})


def alert_line(pid: int, host: str | None = None) -> str:
    """A miner alert's two lines: what matched, then the miner's command line, escaped."""
    hms = datetime.fromtimestamp(T0 // 1_000_000_000).strftime("%H:%M:%S")
    host_column = "" if host is None else f"{host:<12} "
    return (
        f"{hms}.000 {host_column}ALERT   {pid:<7} test             [high] miner flags "
        "(rule 00000000-0000-4000-8000-00000000f00d)\n"
        f"{' ' * (13 + len(host_column))}cmd: /tmp/.x/kworker -o stratum+tcp://198.51.100.1:3333 "
        "'\\x1b[2J'"
    )


def two(lines: Lines) -> str:
    """The next two lines (an alert's), as the renderer made them."""
    return lines.next() + "\n" + lines.next()


def kinds_pids(lines: list[str]) -> list[tuple[str, int]]:
    out = []
    for line in lines:
        item: dict[str, Any] = json.loads(line)
        out.append((item["kind"], item["process"]["pid"]))
    return out


def test_tail_shows_what_its_filters_let_through(tmp_path: Path) -> None:
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port)
        alerts, _ = tail(procs, tmp_path, port, "--alerts-only", "--host", "H")
        connects, _ = tail(procs, tmp_path, port, "--kind", "connect", "-o", "json")
        box, _ = tail(procs, tmp_path, port, "--sandbox", "sbX", "-o", "json")
        send(
            port,
            0,
            [
                miner(4321, "H", "sbX"),
                miner(4322, "H2", "sbY"),
                connect(5000, "H", "sbX"),
                connect(5001, "H2", "sbY"),
            ],
        )
        # the last batch marks the end: what each tail shows before it is all it got
        send(
            port,
            1,
            [miner(4323, "H", "sbY"), connect(5002, "H", "sbY"), connect(5003, "H2", "sbX")],
        )

        assert alerts.next().startswith("TIME         KIND    PID")  # the header, no HOST column
        assert [two(alerts), two(alerts)] == [alert_line(4321), alert_line(4323)]
        assert kinds_pids([connects.next() for _ in range(4)]) == [
            ("connect", 5000),
            ("connect", 5001),
            ("connect", 5002),
            ("connect", 5003),
        ]
        got = [box.next() for _ in range(4)]
        assert kinds_pids(got) == [
            ("exec", 4321),
            ("alert", 4321),  # right after the event that raised it
            ("connect", 5000),
            ("connect", 5003),
        ]
        exec_line = json.loads(got[0])
        assert [bytes_from_json(a) for a in exec_line["argv"]] == [
            b"kworker",
            b"-o",
            b"stratum+tcp://198.51.100.1:3333",
            b"\x1b[2J",
        ]
        assert json.loads(got[1])["events"][0]["process"]["pid"] == 4321
        for lines in (alerts, connects, box):
            assert lines.quiet(0.5), lines.buf
            lines.proc.send_signal(signal.SIGTERM)
            assert lines.proc.wait(timeout=10) == 0


def test_tail_sees_each_alert_right_after_the_event_that_raised_it(tmp_path: Path) -> None:
    """A batch whose third event raises an alert, then one whose first and last do: the
    tail gets the events and alerts in the order they happened, not a batch's events and
    then its alerts."""
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port)
        out, _ = tail(procs, tmp_path, port, "-o", "json")
        send(
            port,
            0,
            [
                connect(1, "H", "sb"),
                connect(2, "H", "sb"),
                miner(3, "H", "sb"),  # raises an alert
                connect(4, "H", "sb"),
                connect(5, "H", "sb"),
            ],
        )
        send(port, 1, [miner(6, "H", "sb"), connect(7, "H", "sb"), miner(8, "H", "sb")])
        assert kinds_pids([out.next() for _ in range(11)]) == [
            ("connect", 1),
            ("connect", 2),
            ("exec", 3),
            ("alert", 3),
            ("connect", 4),
            ("connect", 5),
            ("exec", 6),
            ("alert", 6),
            ("connect", 7),
            ("exec", 8),
            ("alert", 8),
        ]
        assert out.quiet(0.5), out.buf


def test_tail_refusals_exit_2_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port)
        (tmp_path / "wrong").write_text("nope")
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "tail",
                "--server",
                f"http://127.0.0.1:{port}",
                "--token-file",
                str(tmp_path / "wrong"),
            ],
            cwd=ROOT_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (refused.returncode, refused.stdout) == (2, "")
        assert refused.stderr == (
            f"sandtrace: http://127.0.0.1:{port} refused the token (401): check --token-file\n"
        )
        bad_kind = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "tail",
                "--server",
                f"http://127.0.0.1:{port}",
                "--kind",
                "exec,exce",
            ],
            cwd=ROOT_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert bad_kind.returncode == 2
        assert bad_kind.stderr.startswith("sandtrace: unknown kind 'exce'; known: bind,")


def test_tail_reconnects_when_the_service_comes_back(tmp_path: Path) -> None:
    port = free_port()
    with processes() as procs:
        first = serve(procs, tmp_path, port)
        out, err = tail(procs, tmp_path, port, "--alerts-only")
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=20) == 0, first.seen
        assert err.next() == (
            f"sandtrace: http://127.0.0.1:{port} closed the stream; reconnecting, Ctrl-C stops"
        )
        assert err.next().startswith(f"sandtrace: cannot reach http://127.0.0.1:{port} (")
        assert err.seen[-1].endswith("retrying, Ctrl-C stops. is `sandtrace serve` running there?")
        serve(procs, tmp_path, port)
        assert err.next(timeout=20) == f"sandtrace: reconnected to http://127.0.0.1:{port}"
        send(port, 0, [miner(4400, "H", "sbX")])
        assert out.next().startswith("TIME         HOST         KIND")  # once only
        assert two(out) == alert_line(4400, "H")
        out.proc.send_signal(signal.SIGINT)
        assert out.proc.wait(timeout=10) == 0


def test_tail_over_https_checks_the_certificate(tmp_path: Path) -> None:
    tls, other = make_tls(tmp_path / "tls", ["127.0.0.1"]), make_tls(tmp_path / "o", ["x"], "other")
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port, "--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
        out, _ = tail(
            procs, tmp_path, port, "--host", "H", "--ca-file", str(tls.ca), scheme="https"
        )
        body = encode_batch("c1", 0, [miner(4500, "H", "sbX")])
        request = urllib.request.Request(
            f"https://127.0.0.1:{port}/v1/batches",
            data=body,
            method="POST",
            headers={"Content-Type": CONTENT_TYPE, "Authorization": f"Bearer {TOKEN}"},
        )
        context = ssl.create_default_context(cafile=str(tls.ca))
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:  # noqa: S310
            assert resp.status == 200
        out.next()  # the header
        assert out.next().split()[1:3] == ["exec", "4500"]
        assert two(out) == alert_line(4500)
        refused = subprocess.run(
            [
                sys.executable,
                "-m",
                "sandtrace",
                "tail",
                "--server",
                f"https://127.0.0.1:{port}",
                "--token-file",
                str(tmp_path / "token"),
                "--ca-file",
                str(other.ca),
            ],
            cwd=ROOT_DIR,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert refused.returncode == 2
        assert refused.stderr.startswith(f"sandtrace: TLS with https://127.0.0.1:{port} failed")
        assert refused.stderr.endswith("give its CA with --ca-file\n")


def test_tail_ends_quietly_when_its_reader_goes(tmp_path: Path) -> None:
    port = free_port()
    with processes() as procs:
        serve(procs, tmp_path, port)
        out, err = tail(procs, tmp_path, port)
        assert out.next().startswith("TIME")
        assert out.proc.stdout is not None
        out.proc.stdout.close()  # as `sandtrace tail | head -1` does after its line
        send(port, 0, [miner(4600, "H", "sbX")])
        assert out.proc.wait(timeout=10) == 0
        assert err.proc.stderr is not None
        assert err.buf + err.proc.stderr.read() == b""


def test_tail_names_both_wire_versions_when_they_differ(tmp_path: Path) -> None:
    """A server from another sandtrace version: tail exits 2 and says what each side speaks."""
    path = tmp_path / "tail.sock"

    async def newer(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(
            json.dumps(
                {"type": "hello", "wire_version": WIRE_VERSION + 1, "tail_version": 1, "filter": {}}
            )
        )
        await ws.receive()
        return ws

    async def scenario() -> tuple[int | None, bytes, bytes]:
        app = web.Application()
        app.router.add_get("/v1/tail", newer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.UnixSite(runner, str(path)).start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "sandtrace",
                "tail",
                "--socket",
                str(path),
                cwd=ROOT_DIR,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            return proc.returncode, out, err
        finally:
            await runner.cleanup()

    code, out, err = asyncio.run(scenario())
    assert (code, out) == (2, b"")
    assert err.decode() == (
        f"sandtrace: {path} sends event wire version {WIRE_VERSION + 1}; this sandtrace "
        f"reads version {WIRE_VERSION}: run the same sandtrace version on both sides\n"
    )
