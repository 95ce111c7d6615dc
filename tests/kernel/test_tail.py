"""`sandtrace tail` against a real `sandtrace watch`, over the watch's Unix socket: what a
process in the traced cgroup does shows up with its exact pid and argv, filtered by kind."""

from __future__ import annotations

import json
import signal
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

from api.render import bytes_from_json, format_argv
from collector import cgroups
from tests.kernel.tracer import PYTHON, python_exe
from tests.serving import free_port
from tests.unit.test_tail_service import Lines, processes, sandtrace

CONNECTOR = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1]))).close()"


def parsed(lines: Lines, count: int) -> list[dict[str, Any]]:
    return [json.loads(lines.next()) for _ in range(count)]


def test_tail_follows_a_watch_over_its_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "run" / "tail.sock"
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        with processes() as procs:
            watch = sandtrace(
                "watch",
                "--json",
                "--no-detect",
                "--cgroup",
                str(box.path),
                "--tail-socket",
                str(sock_path),
            )
            procs.append(watch)
            watch_err = Lines(watch, "stderr")
            watch_err.until("watching", timeout=120)
            assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
            tails = {}
            for name, args in (
                ("all", ["-o", "json"]),
                ("exec", ["-o", "json", "--kind", "exec"]),
                ("compact", ["--color", "never", "--width", "400", "--kind", "exec"]),
            ):
                proc = sandtrace("tail", "--socket", str(sock_path), *args)
                procs.append(proc)
                err = Lines(proc, "stderr")
                what = "everything" if name == "all" else "kind=exec"
                assert err.next() == f"sandtrace: following {sock_path} ({what}); Ctrl-C stops"
                assert err.next() == (
                    "sandtrace: detection is off in this collector (--no-detect); alerts are "
                    "not available here"
                )
                tails[name] = (Lines(proc, "stdout"), err)

            argv = [PYTHON, "-c", CONNECTOR, str(port), "\x1b[31mred"]
            subprocess.run(argv, preexec_fn=box.join, check=True, timeout=30)
            subprocess.run(["/bin/true", "end"], preexec_fn=box.join, check=True)

            # exactly the two execs, in order, each with its pid and argv
            execs = parsed(tails["exec"][0], 2)
            assert [(e["kind"], [bytes_from_json(a) for a in e["argv"]]) for e in execs] == [
                ("exec", [a.encode() for a in argv]),
                ("exec", [b"/bin/true", b"end"]),
            ]
            pids = [e["process"]["pid"] for e in execs]
            assert tails["exec"][0].quiet(0.5)

            everything: list[dict[str, Any]] = []
            while not any(
                e["kind"] == "exit" and e["process"]["pid"] == pids[1] for e in everything
            ):
                everything.append(json.loads(tails["all"][0].next()))
            assert "lost" not in {e["kind"] for e in everything}
            # a connect may wait for its outcome, so only the execs' order is certain here
            mine = sorted((e["process"]["pid"], e["kind"]) for e in everything)
            assert mine == sorted(
                [
                    (pids[0], "exec"),
                    (pids[0], "connect"),
                    (pids[0], "exit"),
                    (pids[1], "exec"),
                    (pids[1], "exit"),
                ]
            )
            conn = next(e for e in everything if e["kind"] == "connect")
            assert (conn["daddr"], conn["dport"], conn["outcome"]) == ("127.0.0.1", port, "success")

            compact, _ = tails["compact"]
            assert compact.next().startswith("TIME         KIND    PID")
            detail = format_argv([python_exe(), *[a.encode() for a in argv[1:]]])
            line = compact.next()
            assert "\x1b" not in line
            assert line.endswith(f" exec    {pids[0]:<7} python3          {detail}"), line
            assert "'\\x1b[31mred'" in detail

            # watch stops: each tail says so and keeps trying; SIGTERM ends it with 0
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=60) == 0
            assert not sock_path.exists()
            for out, err in tails.values():
                assert err.next() == (
                    f"sandtrace: {sock_path} closed the stream; reconnecting, Ctrl-C stops"
                )
                assert err.next().endswith(
                    "retrying, Ctrl-C stops. is `sandtrace watch` running (without --no-tail)?"
                )
                out.proc.send_signal(signal.SIGTERM)
                assert out.proc.wait(timeout=10) == 0
    finally:
        listener.close()
        box.destroy()


def test_watch_goes_on_without_a_tail_socket_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    sock_path = tmp_path / "file" / "tail.sock"  # its directory is a file
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    try:
        with processes() as procs:
            watch = sandtrace(
                "watch",
                "--json",
                "--no-detect",
                "--cgroup",
                str(box.path),
                "--tail-socket",
                str(sock_path),
            )
            procs.append(watch)
            err = Lines(watch, "stderr")
            err.until("watching", timeout=120)
            warning = err.next()
            assert "live tail disabled" in warning
            assert f"cannot create {sock_path.parent}: a file is in the way" in warning
            subprocess.run(["/bin/true", "still", "traced"], preexec_fn=box.join, check=True)
            out = Lines(watch, "stdout")
            event = json.loads(out.until('"kind":"exec"'))
            assert [bytes_from_json(a) for a in event["argv"]] == [
                b"/bin/true",
                b"still",
                b"traced",
            ]
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=60) == 0
    finally:
        box.destroy()


def test_tail_of_a_streaming_watch_says_why_no_alerts_come(tmp_path: Path) -> None:
    """A watch that streams to a service detects nothing itself: `tail --alerts-only` on its
    socket says so once, instead of waiting in silence. The watch, whose service is down,
    says that once too."""
    sock_path = tmp_path / "tail.sock"
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    try:
        with processes() as procs:
            watch = sandtrace(
                "watch",
                "--json",
                "--cgroup",
                str(box.path),
                "--tail-socket",
                str(sock_path),
                "--server",
                url,
                "--spool-dir",
                str(tmp_path / "spool"),
            )
            procs.append(watch)
            watch_err = Lines(watch, "stderr")
            assert watch_err.until("watching", timeout=120).endswith(
                f"(streaming to {url}); Ctrl-C or SIGTERM stops"
            )
            notice = (
                f"sandtrace: detection runs in the service at {url}; alerts are not available "
                f"here (follow them with: sandtrace tail --server {url})"
            )
            tail = sandtrace("tail", "--socket", str(sock_path), "--alerts-only")
            procs.append(tail)
            err = Lines(tail, "stderr")
            assert err.next() == f"sandtrace: following {sock_path} (alerts_only=1); Ctrl-C stops"
            assert err.next() == notice
            for _ in range(3):
                subprocess.run(["/bin/true"], preexec_fn=box.join, check=True)
            assert watch_err.next(timeout=30) == (
                f"sandtrace: service {url} unreachable (Connection refused); holding events, "
                f"spooling to {tmp_path / 'spool'}"
            )
            assert watch_err.quiet(2.0)  # once, however often the sender retries
            # a tail without a filter is told as well: it sees events, but never an alert
            every = sandtrace("tail", "--socket", str(sock_path), "-o", "json")
            procs.append(every)
            every_err = Lines(every, "stderr")
            assert every_err.next().startswith("sandtrace: following")
            assert every_err.next() == notice
            assert err.quiet(0.5)  # said once per tail
            watch.send_signal(signal.SIGTERM)
            assert watch.wait(timeout=60) == 0
            # reconnecting, the tail is not told again
            assert err.next().endswith("closed the stream; reconnecting, Ctrl-C stops")
    finally:
        box.destroy()
