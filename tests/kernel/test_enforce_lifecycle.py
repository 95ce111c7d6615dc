"""What enforcement does when its collector stops (README, Enforcement), with real processes:

- a clean stop (SIGTERM) detaches the programs: the sandbox is no longer held (fail-open);
- SIGKILL leaves them attached: the kernel keeps refusing, addresses learnt before the kill
  stay allowed until they expire, and new DNS answers no longer teach (the kernel empties
  the DNS parse's program array once no process holds it);
- a collector started again on the sandbox takes the dead one's place: one program per
  hook, never two.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from collector import cgroups
from probes import kernel
from probes.enforce import attached_programs
from tests.kernel.dnsserver import dns_server
from tests.kernel.test_enforce import RESOLVER, ZONE

PORT = 18444
ALLOWED = "127.0.0.95"
REFUSED = "127.0.0.90"
CONNECT4 = 10  # BPF_CGROUP_INET4_CONNECT

CONNECTS = r"""
import errno, json, socket, struct, sys
out = []
for step in json.loads(sys.argv[1]):
    if step[0] == "query":
        q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
        q += b"".join(bytes((len(p),)) + p.encode() for p in step[1].split(".")) + b"\0"
        q += struct.pack("!HH", 1, 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(q, (step[2], 53))
        out.append(socket.inet_ntoa(s.recv(512)[-4:]))
        s.close()
        continue
    s = socket.socket()
    s.settimeout(5)
    try:
        s.connect((step[1], step[2]))
        out.append("ok")
    except OSError as e:
        out.append("E" + errno.errorcode[e.errno])
    s.close()
print(json.dumps(out))
"""

HOLDER = r"""
import dataclasses, ipaddress, sys, time
from pathlib import Path
from collector.enforce import Enforcer
from detect.egress import EgressPolicies, EgressPolicy
from probes import kernel
from probes.loader import ProbeConfig, Probes
path, resolver = Path(sys.argv[1]), sys.argv[2]
probes = Probes(ProbeConfig(enforce=True), kernel.check())
policy = EgressPolicy.parse(
    ["www.allowed.test", "long.allowed.test", "127.0.0.95"], allow_loopback=False
)
policy = dataclasses.replace(policy, resolvers=(ipaddress.ip_address(resolver),))
Enforcer(probes.policy(), {"held": 0}).apply(EgressPolicies(per_sandbox={"held": policy}))
probes.trace_cgroup(path, 0)
print("ready", flush=True)
time.sleep(600)
"""


def accepted(listener: list[int], expected: int) -> int:
    """The listener's accept count once it has reached `expected` (a connect returns when the
    handshake is done; the listener's thread accepts it a moment later) or 5 s have passed."""
    deadline = time.monotonic() + 5
    while listener[0] < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return listener[0]


def in_sandbox(sb: cgroups.SandboxCgroup, steps: list[list[object]]) -> list[str]:
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", CONNECTS, json.dumps(steps)],
        preexec_fn=sb.join,
        capture_output=True,
        timeout=30,
        check=True,
    )
    return list(json.loads(proc.stdout))


def programs(sb: cgroups.SandboxCgroup) -> list[int]:
    fd = os.open(sb.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return attached_programs(fd, CONNECT4)
    finally:
        os.close(fd)


@pytest.fixture
def sandbox() -> Iterator[cgroups.SandboxCgroup]:
    sb = cgroups.create_sandbox(cgroups.find_cgroup2_root())
    try:
        yield sb
    finally:
        sb.destroy()  # with the cgroup go its attachments


@pytest.fixture
def listener() -> Iterator[list[int]]:
    accepted = [0]
    socks = []
    for addr in (ALLOWED, REFUSED, "127.0.0.89", "127.0.0.96"):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, PORT))
        s.listen(16)
        socks.append(s)

    def serve(s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            accepted[0] += 1
            conn.close()

    for s in socks:
        threading.Thread(target=serve, args=(s,), daemon=True).start()
    try:
        yield accepted
    finally:
        for s in socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[None]:
    with dns_server(ZONE, RESOLVER, tmp_path):
        yield None


def watch(sb: cgroups.SandboxCgroup, tmp_path: Path) -> subprocess.Popen[str]:
    """`sandtrace watch --enforce` on the sandbox, running once it has said so."""
    argv = [
        sys.executable, "-m", "sandtrace", "watch", "--cgroup", str(sb.path), "--enforce",
        "--egress-allow", f"{ALLOWED}:{PORT}", "--egress-check-loopback", "--no-tail",
        "--json", "--events", str(tmp_path / "events.jsonl"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("sandtrace: watching"):
            # the rest is read (and the pipe closed) as it comes, so that watch never blocks
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc
    proc.wait()
    proc.stderr.close()
    raise AssertionError(f"watch did not start ({proc.returncode}): {''.join(lines)}")


def _drain(stream: IO[str]) -> None:
    with stream:
        for _ in stream:
            pass


def test_sigkill_keeps_refusing_a_restart_takes_over_a_clean_stop_lifts_it(
    sandbox: cgroups.SandboxCgroup, listener: list[int], tmp_path: Path
) -> None:
    steps: list[list[object]] = [["tcp", REFUSED, PORT], ["tcp", ALLOWED, PORT]]
    first = watch(sandbox, tmp_path)
    try:
        assert in_sandbox(sandbox, steps) == ["EEPERM", "ok"]
        [prog] = programs(sandbox)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # the collector is gone; its programs stay attached and keep refusing
        assert programs(sandbox) == [prog]
        assert in_sandbox(sandbox, steps) == ["EEPERM", "ok"]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    second = watch(sandbox, tmp_path)
    try:
        # the new collector's program took the dead one's place: one, not two
        [taken] = programs(sandbox)
        assert taken != prog
        assert in_sandbox(sandbox, steps) == ["EEPERM", "ok"]
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    # a clean stop detaches: the sandbox is no longer held (fail-open)
    assert programs(sandbox) == []
    assert in_sandbox(sandbox, steps) == ["ok", "ok"]
    assert accepted(listener, 1 + 1 + 1 + 2) == 1 + 1 + 1 + 2


def test_after_sigkill_learnt_addresses_stay_and_new_answers_teach_nothing(
    sandbox: cgroups.SandboxCgroup, listener: list[int], dns: None
) -> None:
    assert kernel.check().attach_types
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(sandbox.path), RESOLVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    try:
        # (its logs come first)
        assert any(line.strip() == "ready" for line in holder.stdout)
        steps: list[list[object]] = [
            ["query", "www.allowed.test", RESOLVER],
            ["tcp", "127.0.0.89", PORT],
        ]
        assert in_sandbox(sandbox, steps) == ["127.0.0.89", "ok"]
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        holder.stdout.close()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert in_sandbox(
        sandbox,
        [
            ["tcp", "127.0.0.89", PORT],  # learnt before the kill: the floor's 30 s hold
            ["tcp", REFUSED, PORT],
            ["query", "long.allowed.test", RESOLVER],
            ["tcp", "127.0.0.96", PORT],  # an allowed name, answered after the kill
        ],
    ) == ["ok", "EEPERM", "127.0.0.96", "EEPERM"]
