"""Exec events carry the executed file's identity and standard streams: real probes, real
processes in sandboxes, values compared with what the test made (its copies' digests, its
listener's port, its pipes).

The first test runs the whole collector (`sandtrace run --json`), so the identity and the
streams are filled where the pipeline fills them; the others use the session's probes and
complete the exec events they collect with the collector's enricher while the process
still runs, as the pipeline does a few milliseconds after the exec.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.events import AnyEvent, ExecEvent
from collector.enrich import ExecEnricher
from collector.identity import Identities
from collector.packages import PackageIndex
from collector.stdio import StdioReader
from tests.kernel.tracer import Sandbox, Tracer

SANDTRACE = [sys.executable, "-m", "sandtrace"]
ROOT_DIR = Path(__file__).resolve().parents[2]

# Connects to the test's listener, makes the socket its stdin and stdout, /dev/null its
# stderr, and becomes the program under test.
CONNECT_AND_EXEC = """
import os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
os.dup2(s.fileno(), 0)
os.dup2(s.fileno(), 1)
os.dup2(os.open("/dev/null", os.O_WRONLY), 2)
os.execv(sys.argv[2], [sys.argv[2]])
"""


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def renamed_copy(src: str, directory: Path, name: str) -> Path:
    copy = directory / name
    shutil.copy2(src, copy)
    return copy


def read_events_until(
    proc: subprocess.Popen[bytes], want: Any, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """JSON events from `sandtrace run`'s stdout until one satisfies `want`. Reads the pipe
    itself (os.read): a buffered reader would hold lines the selector cannot see."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    events: list[dict[str, Any]] = []
    rest = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not sel.select(timeout=0.5):
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            events.append(json.loads(line))
            if want(events[-1]):
                return events
    raise AssertionError(f"no such event within {timeout}s: {events[-5:]!r}")


def test_run_fills_identity_and_tcp_stdio(tmp_path: Path) -> None:
    """A renamed copy of cat whose stdin and stdout are a TCP connection to the test's
    listener: a reverse shell's shape, as `sandtrace run` reports it."""
    copy = renamed_copy("/usr/bin/cat", tmp_path, "kworker-x")
    digest = sha256_of(copy)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        listener.settimeout(30)
        proc = subprocess.Popen(
            [
                *SANDTRACE,
                "run",
                "--json",
                "--no-tail",
                "--no-detect",
                "--",
                "/usr/bin/python3",
                "-c",
                CONNECT_AND_EXEC,
                str(port),
                str(copy),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT_DIR,
        )
        try:
            conn, _ = listener.accept()
            with conn:
                events = read_events_until(
                    proc, lambda e: e["kind"] == "exec" and e["filename"] == str(copy)
                )
                conn.sendall(b"ping\n")  # the copy is cat: it answers, then sees EOF
                assert conn.recv(5) == b"ping\n"
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    ev = events[-1]
    assert ev["process"]["exe"] == str(copy)
    assert ev["sha256"] == digest
    assert ev["original_exe"] == "/usr/bin/cat"
    assert ev["go_module"] == ""
    assert ev["stdio"] == [f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}", "null"]
    assert b"exec identity:" in err


# -- through the session's probes -------------------------------------------------------------


@pytest.fixture
def enricher() -> Iterator[ExecEnricher]:
    e = ExecEnricher(Identities(PackageIndex()), StdioReader())
    try:
        yield e
    finally:
        e.close()


def complete(enricher: ExecEnricher, events: list[AnyEvent]) -> list[AnyEvent]:
    """What the pipeline does to a batch, synchronously."""
    out = list(events)
    batch = enricher.begin(out)
    if batch is not None:
        batch.work()
        batch.apply()
    return out


def exec_of(tracer: Tracer, sb: Sandbox, pid: int) -> ExecEvent:
    """The exec event of `pid` (its last one), once it arrived."""

    def found(evs: list[AnyEvent]) -> list[ExecEvent]:
        return [
            e
            for e in evs
            if isinstance(e, ExecEvent) and e.sandbox == sb.name and e.process.pid == pid
        ]

    return found(tracer.wait_for(lambda evs: bool(found(evs))))[-1]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for p in started:
            p.kill()
            p.communicate()


def test_pipe_and_null_streams_of_a_deleted_renamed_copy(
    tracer: Tracer,
    enricher: ExecEnricher,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    copy = renamed_copy("/usr/bin/sleep", tmp_path, ".hidden")
    digest = sha256_of(copy)
    with tracer.sandbox() as sb:
        proc = sb.spawn(
            [str(copy), "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # no controlling terminal
        )
        procs.append(proc)
        ev = exec_of(tracer, sb, proc.pid)
        copy.unlink()  # the running file is still read, through /proc/PID/exe
        (done,) = complete(enricher, [ev])
    assert isinstance(done, ExecEvent)
    assert done.exe_inode == ev.exe_inode
    assert (done.sha256, done.original_exe, done.go_module) == (digest, b"/usr/bin/sleep", "")
    assert done.stdio == ["null", "pipe", "null"]
    assert enricher.identities.stats.misses == 1


def test_a_go_program_that_exited_is_identified_by_its_path(
    tracer: Tracer, enricher: ExecEnricher, tmp_path: Path
) -> None:
    copy = renamed_copy("/usr/bin/age", tmp_path, "svc")
    with tracer.sandbox() as sb:
        pid, out, _ = sb.run(
            [str(copy), "--version"], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ev = exec_of(tracer, sb, pid)
    assert (
        out.strip()
        == subprocess.run(
            ["/usr/bin/age", "--version"], capture_output=True, check=True
        ).stdout.strip()
    )
    (done,) = complete(enricher, [ev])
    assert isinstance(done, ExecEvent)
    assert done.sha256 == sha256_of(copy)
    assert done.original_exe == b"/usr/bin/age"
    assert done.go_module == "filippo.io/age/cmd/age"
    assert done.stdio == ["null", "pipe", "null"]  # gone, but captured at its exec


def test_unix_socket_and_tty_streams(
    tracer: Tracer,
    enricher: ExecEnricher,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.sock"
    master, slave = os.openpty()
    try:
        with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
            server.bind(str(path))
            server.listen()
            client.connect(str(path))
            with server.accept()[0], tracer.sandbox() as sb:
                proc = sb.spawn(["/usr/bin/sleep", "60"], stdin=client, stdout=slave, stderr=client)
                procs.append(proc)
                (done,) = complete(enricher, [exec_of(tracer, sb, proc.pid)])
    finally:
        os.close(master)
        os.close(slave)
    assert isinstance(done, ExecEvent)
    assert done.stdio == [f"unix:{path}", "tty", f"unix:{path}"]
    assert done.original_exe == os.path.realpath("/usr/bin/sleep").encode()


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    """An overlayfs mount (as container sandboxes run from), unmounted at the end."""
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    merged = tmp_path / "merged"
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},"
            f"workdir={tmp_path / 'work'}",
            str(merged),
        ],
        check=True,
    )
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=True)


def test_a_program_on_overlayfs_running_and_gone(
    tracer: Tracer,
    enricher: ExecEnricher,
    procs: list[subprocess.Popen[bytes]],
    overlay: Path,
) -> None:
    """A renamed copy in the overlay's lower layer, seen through the merged mount: while it
    runs (through /proc/PID/exe) and after it exited (through its path): the inode the
    kernel reports is the one both give."""
    lower = overlay.parent / "lower"
    renamed_copy("/usr/bin/sleep", lower, "runner")
    renamed_copy("/usr/bin/true", lower, "quick")
    with tracer.sandbox() as sb:
        proc = sb.spawn(
            [str(overlay / "runner"), "60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        running = exec_of(tracer, sb, proc.pid)
        pid, _, _ = sb.run(
            [str(overlay / "quick")], stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        gone = exec_of(tracer, sb, pid)
        done = complete(enricher, [running, gone])
    assert [e.process.exe for e in (running, gone)] == [
        str(overlay / "runner").encode(),
        str(overlay / "quick").encode(),
    ]
    first, second = done
    assert isinstance(first, ExecEvent) and isinstance(second, ExecEvent)
    assert (first.sha256, first.original_exe) == (sha256_of(lower / "runner"), b"/usr/bin/sleep")
    assert first.stdio == ["null", "null", "null"]
    assert (second.sha256, second.original_exe) == (sha256_of(lower / "quick"), b"/usr/bin/true")
    assert second.stdio == ["null", "pipe", "null"]  # gone, but captured at its exec


def test_exec_records_carry_the_file_version_stat_tells(
    tracer: Tracer, enricher: ExecEnricher, tmp_path: Path
) -> None:
    """The kernel reads the executed file's device, change time and size at exec; they are
    what stat(2) says of the file, so that the identity cache needs no stat per exec: a
    second run of a file that is gone by then is still known."""
    copy = renamed_copy("/usr/bin/true", tmp_path, "kt")
    st = copy.stat()
    want = (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_size)
    keyed: list[tuple[ExecEvent, tuple[int, int, int, int] | None]] = []
    with tracer.sandbox() as sb:
        for _ in range(2):
            sb.spawn([str(copy)]).wait()
        deadline = time.monotonic() + 10
        while len(keyed) < 2:
            assert time.monotonic() < deadline, "the exec events did not arrive"
            events, _ = tracer.assembler.feed_batches(tracer.probes.queue.drain())
            tracer.events.extend(events)
            keys = tracer.assembler.exec_file_keys
            keyed += [
                (e, keys.get(id(e)))
                for e in events
                if isinstance(e, ExecEvent) and e.sandbox == sb.name and e.exe_inode == st.st_ino
            ]
            time.sleep(0.02)
    assert [k for _, k in keyed] == [want, want]
    assert all(e.stdio for e, _ in keyed)  # captured at exec: the key is used
    (first, _), (second, _) = keyed
    assert complete_keyed(enricher, first, want).sha256 == sha256_of(copy)
    copy.unlink()
    assert complete_keyed(enricher, second, want).sha256 == sha256_of_true()
    stats = enricher.identities.stats
    assert (stats.misses, stats.hits, stats.failures) == (1, 1, 0)


def complete_keyed(enricher: ExecEnricher, ev: ExecEvent, key: tuple[int, int, int, int]) -> Any:
    out: list[AnyEvent] = [ev]
    batch = enricher.begin(out, {id(ev): key})
    if batch is not None:
        batch.work()
        batch.apply()
    return out[0]


def sha256_of_true() -> str:
    return sha256_of(Path("/usr/bin/true"))
