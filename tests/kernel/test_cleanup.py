"""A clean exit leaves no BPF program, no cgroup and no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from collector import cgroups
from tests.kernel.tracer import first_line_after_notes, without_notes

SANDTRACE = [sys.executable, "-m", "sandtrace"]
ROOT_DIR = Path(__file__).resolve().parents[2]


def prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "list"], check=True, capture_output=True, text=True
    ).stdout
    return {p["id"] for p in json.loads(out)}


def alive(pid: int) -> bool:
    """True while pid runs; a killed orphan may linger as a zombie until init reaps it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def sandboxes(root: Path) -> set[str]:
    parent = root / "sandtrace"
    return {p.name for p in parent.iterdir() if p.is_dir()} if parent.exists() else set()


def test_run_exits_with_the_command_code_and_leaves_nothing() -> None:
    root = cgroups.find_cgroup2_root()
    before_progs, before_sb = prog_ids(), sandboxes(root)
    # The command leaves a background process behind; run must kill it on the way out.
    proc = subprocess.run(
        [*SANDTRACE, "run", "--json", "--", "sh", "-c", "sleep 300 & echo $! >&2; exit 5"],
        capture_output=True,
        text=True,
        cwd=ROOT_DIR,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 5, proc.stderr
    leftover = int(without_notes(proc.stderr)[1])
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    execs = [e for e in events if e["kind"] == "exec"]
    assert [e["argv"][0] for e in execs] == ["sh", "sleep"]
    exits = {e["process"]["pid"]: e for e in events if e["kind"] == "exit"}
    assert exits[leftover]["signal"] == signal.SIGKILL  # killed by run, and seen dying
    assert not alive(leftover)
    assert prog_ids() == before_progs
    assert sandboxes(root) == before_sb


def test_watch_stops_on_sigterm_and_unloads() -> None:
    root = cgroups.find_cgroup2_root()
    box = cgroups.create_sandbox(root)
    before = prog_ids()
    try:
        proc = subprocess.Popen(
            [*SANDTRACE, "watch", "--cgroup", str(box.path)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT_DIR,
        )
        assert proc.stderr is not None
        line = first_line_after_notes(proc.stderr)
        assert "watching" in line and "SIGTERM" in line
        assert len(prog_ids() - before) >= 10  # the probes are loaded while it runs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 5
        while prog_ids() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert prog_ids() == before
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        box.destroy()
