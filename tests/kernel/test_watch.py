"""`sandtrace watch` as a real process: sockets held before it started, then live events."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from collector import cgroups
from tests.kernel.tracer import PYTHON, first_line_after_notes

ROOT_DIR = Path(__file__).resolve().parents[2]

HOLDER = """
import socket, sys
t = socket.socket(); t.bind(("127.0.0.1", 0)); t.listen(4)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::1", 0))
print(t.getsockname()[1], u.getsockname()[1], flush=True)
sys.stdin.readline()  # the test says when to connect
c = socket.socket(); c.connect(t.getsockname()); print(c.getsockname()[1], flush=True)
sys.stdin.readline()
"""


def read_until(stream: Any, pred: Any, limit: int = 2000) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for _ in range(limit):
        line = stream.readline()
        assert line, f"watch ended early; saw {seen!r}"
        seen.append(json.loads(line))
        if pred(seen[-1]):
            return seen
    raise AssertionError("event never came")


def test_watch_reports_held_sockets_then_live_events() -> None:
    box = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    holder = subprocess.Popen(
        [PYTHON, "-c", HOLDER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=box.join,  # noqa: PLW1509
    )
    watch = None
    try:
        assert holder.stdout is not None and holder.stdin is not None
        tcp_port, udp_port = map(int, holder.stdout.readline().split())
        watch = subprocess.Popen(
            [sys.executable, "-m", "sandtrace", "watch", "--json", "--cgroup", str(box.path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT_DIR,
        )
        assert watch.stdout is not None and watch.stderr is not None
        assert "watching" in first_line_after_notes(watch.stderr)
        held = [json.loads(watch.stdout.readline()) for _ in range(2)]
        mine = {
            (e["protocol"], e["family"], e["state"], e["lport"])
            for e in held
            if e["kind"] == "socket" and e["process"]["pid"] == holder.pid
        }
        assert mine == {
            ("tcp", "ipv4", "listen", tcp_port),
            ("udp", "ipv6", "unconnected", udp_port),
        }
        assert all(
            e["sandbox"] == "/" + str(box.path.relative_to(box.path.parents[1])) for e in held
        )
        holder.stdin.write("go\n")
        holder.stdin.flush()
        sport = int(holder.stdout.readline())
        events = read_until(watch.stdout, lambda e: e["kind"] == "connect")
        conn = events[-1]
        assert conn["process"]["pid"] == holder.pid
        assert (conn["daddr"], conn["dport"], conn["sport"], conn["outcome"]) == (
            "127.0.0.1",
            tcp_port,
            sport,
            "success",
        )
        holder.stdin.write("done\n")
        holder.stdin.flush()
        assert holder.wait(timeout=10) == 0
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=30) == 0
    finally:
        for proc in (holder, watch):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                for f in (proc.stdin, proc.stdout, proc.stderr):
                    if f is not None:
                        f.close()
        box.destroy()
