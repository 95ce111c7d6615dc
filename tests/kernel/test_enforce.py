"""Egress enforcement in the kernel (--enforce): a sandboxed process reaches what its policy
allows, by address or by a name it resolved, and gets EPERM for everything else: an address
it never resolved, a name outside the policy, DNS to a server that is not its resolver, a
datagram sent without connect, a container runtime's unix socket. Names are learnt in the
kernel from the answer before the process reads it: a resolve-then-connect loop against a
server whose every answer is a new address is never refused.

Everything is real: the probes loaded with enforcement, a DNS server
(tests/e2e/services/dns_server.py) on a loopback address, listeners, and the sandboxed
processes. Loopback is judged by the policy like any address (allow_loopback=False), so the
test's addresses are all in 127.0.0.0/8 and no packet leaves the host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import cgroups
from collector.enforce import EnforceError, Enforcer
from detect.egress import EgressPolicies, EgressPolicy
from probes import kernel
from probes.enforce import AF_INET, KernelPolicy
from probes.loader import ProbeConfig, Probes
from tests.kernel.dnsserver import dns_server
from tests.kernel.tracer import PYTHON, Sandbox, Tracer, of

RESOLVER = "127.0.0.88"
OTHER_RESOLVER = "127.0.0.87"
ROTATING = [f"127.0.1.{i}" for i in range(1, 11)]
ZONE = {
    "www.allowed.test": {"A": ["127.0.0.89"], "TTL": 1},
    "long.allowed.test": {"A": ["127.0.0.96"], "TTL": 300},
    "evil.test": {"A": ["127.0.0.90"], "TTL": 60},
    "a.cdn.test": {"A": ["127.0.0.91"], "TTL": 60},
    "cdn.test": {"A": ["127.0.0.93"], "TTL": 60},
    "spin.allowed.test": {"A": ROTATING, "TTL": 1, "ROTATE": True},
}
PORT = 18443
POLICY = EgressPolicy.parse(
    ["www.allowed.test", "long.allowed.test", "spin.allowed.test", "*.cdn.test", "127.0.0.95:8080"],
    allow_loopback=False,
)


@pytest.fixture(scope="module")
def enforcing() -> Iterator[Tracer]:
    probes = Probes(ProbeConfig(enforce=True), kernel.check())
    try:
        yield Tracer(probes, cgroups.find_cgroup2_root())
    finally:
        probes.close()


@pytest.fixture(scope="module")
def policy_maps(enforcing: Tracer) -> KernelPolicy:
    return enforcing.probes.policy()


@pytest.fixture
def dns(tmp_path: Path) -> Iterator[Path]:
    with dns_server(ZONE, RESOLVER, tmp_path) as log:
        yield log


@pytest.fixture
def listeners() -> Iterator[dict[str, int]]:
    """A TCP listener on PORT at every address a connect may reach, counting accepts."""
    addrs = ["127.0.0.89", "127.0.0.90", "127.0.0.91", "127.0.0.93", "127.0.0.96"]
    socks = []
    accepted: dict[str, int] = dict.fromkeys(addrs, 0)
    for addr in addrs:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, PORT))
        s.listen(64)
        socks.append(s)

    def serve(s: socket.socket, addr: str) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            accepted[addr] += 1
            conn.close()

    for s, addr in zip(socks, addrs, strict=True):
        threading.Thread(target=serve, args=(s, addr), daemon=True).start()
    try:
        yield accepted
    finally:
        for s in socks:
            s.shutdown(socket.SHUT_RDWR)
            s.close()


@dataclasses.dataclass
class Enforced:
    sandbox: Sandbox
    index: int
    enforcer: Enforcer


@pytest.fixture
def enforced(enforcing: Tracer, policy_maps: KernelPolicy) -> Iterator[Enforced]:
    with enforcing.sandbox() as sb:
        index = [s.name for s in enforcing.assembler.scopes].index(sb.name)
        policy = dataclasses.replace(POLICY, resolvers=(ipaddress.ip_address(RESOLVER),))
        enforcer = Enforcer(policy_maps, {sb.name: index}, ttl_floor=2.0)
        enforcer.apply(EgressPolicies(per_sandbox={sb.name: policy}))
        yield Enforced(sb, index, enforcer)


CLIENT = r"""
import errno, json, os, socket, struct, sys, time
cfg = json.loads(sys.argv[1])

def query(name, server):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    try:
        s.sendto(q, (server, 53))
        data = s.recv(4096)
    except OSError as e:
        return "E" + errno.errorcode[e.errno]
    finally:
        s.close()
    return socket.inet_ntoa(data[-4:])

def attempt(family, kind, call):
    s = socket.socket(family, kind)
    s.settimeout(5)
    try:
        call(s)
        return "ok"
    except OSError as e:
        return "E" + errno.errorcode[e.errno]
    finally:
        s.close()

def tcp(addr, port):
    return attempt(socket.AF_INET, socket.SOCK_STREAM, lambda s: s.connect((addr, port)))

def udp_send(addr, port):
    return attempt(socket.AF_INET, socket.SOCK_DGRAM, lambda s: s.sendto(b"x", (addr, port)))

def udp_connect(addr, port):
    return attempt(socket.AF_INET, socket.SOCK_DGRAM, lambda s: s.connect((addr, port)))

def unix(path):
    return attempt(socket.AF_UNIX, socket.SOCK_STREAM, lambda s: s.connect(path))

out = []
for step in cfg["steps"]:
    what, args = step[0], step[1:]
    out.append(globals()[what](*args))
print(json.dumps(out), flush=True)
"""


def client(sandbox: Sandbox, steps: list[list[Any]]) -> tuple[int, list[str]]:
    """Run the steps in the sandbox: each one's result, an address, "ok" or "E" + errno."""
    pid, out, _ = sandbox.python(CLIENT, json.dumps({"steps": steps}))
    return pid, json.loads(out)


def test_names_in_the_policy_connect_and_everything_else_gets_eperm(
    enforced: Enforced,
    policy_maps: KernelPolicy,
    dns: Path,
    listeners: dict[str, int],
    tmp_path: Path,
) -> None:
    before = policy_maps.denied()
    runtime = tmp_path / "run"
    runtime.mkdir()
    steps: list[list[Any]] = [
        ["query", "www.allowed.test", RESOLVER],
        ["tcp", "127.0.0.89", PORT],  # resolved just now: allowed
        ["tcp", "127.0.0.96", PORT],  # in the policy, never resolved: no entry yet
        ["query", "evil.test", RESOLVER],
        ["tcp", "127.0.0.90", PORT],  # resolved, but not a name of the policy
        ["query", "a.cdn.test", RESOLVER],
        ["tcp", "127.0.0.91", PORT],  # below *.cdn.test
        ["query", "cdn.test", RESOLVER],
        ["tcp", "127.0.0.93", PORT],  # *.cdn.test is not cdn.test itself
        ["query", "www.allowed.test", OTHER_RESOLVER],  # DNS elsewhere
        ["udp_connect", OTHER_RESOLVER, 53],
        ["udp_send", "127.0.0.90", 9999],  # a datagram without connect, outside the policy
        ["udp_send", "127.0.0.95", 8080],  # the network entry, its port
        ["udp_connect", "127.0.0.95", 8081],  # the network entry, another port
        ["unix", str(runtime / "docker.sock")],  # refused before the path is looked up
        ["unix", str(runtime / "./../run/containerd.sock.ttrpc")],
        ["unix", str(runtime / "app.sock")],  # not a runtime's: the lookup fails
    ]
    pid, got = client(enforced.sandbox, steps)
    assert got == [
        "127.0.0.89",
        "ok",
        "EEPERM",
        "127.0.0.90",
        "EEPERM",
        "127.0.0.91",
        "ok",
        "127.0.0.93",
        "EEPERM",
        "EEPERM",
        "EEPERM",
        "EEPERM",
        "ok",
        "EEPERM",
        "EEPERM",
        "EEPERM",
        "EENOENT",
    ]
    # the refused connects reached no server; the allowed ones did, once each
    assert listeners == {
        "127.0.0.89": 1,
        "127.0.0.90": 0,
        "127.0.0.91": 1,
        "127.0.0.93": 0,
        "127.0.0.96": 0,
    }
    after = policy_maps.denied()
    assert {k: after[k] - before[k] for k in after} == {
        "connect": 4,  # .96, .90, .93, 127.0.0.95:8081
        "send": 1,
        "resolver": 2,  # the datagram to the other resolver, the connect to it
        "unix": 2,
    }
    # each refusal is in the events, as the kernel saw it
    events = enforced.sandbox.events()
    denied = sorted(
        (e.daddr, e.dport, e.protocol)
        for e in of(events, "connect", pid)
        if e.denied and e.protocol != "unix"
    )
    assert denied == sorted(
        [
            ("127.0.0.96", PORT, "tcp"),
            ("127.0.0.90", PORT, "tcp"),
            ("127.0.0.93", PORT, "tcp"),
            (OTHER_RESOLVER, 53, "udp"),
            (OTHER_RESOLVER, 53, "udp"),
            ("127.0.0.90", 9999, "udp"),
            ("127.0.0.95", 8081, "udp"),
        ]
    )
    unix_denied = sorted(
        (e.path, e.outcome, e.errno_name)
        for e in of(events, "connect", pid)
        if e.denied and e.protocol == "unix"
    )
    assert unix_denied == sorted(
        (str(p).encode(), "denied", "EPERM")
        for p in (runtime / "docker.sock", runtime / "./../run/containerd.sock.ttrpc")
    )


def test_a_learnt_address_lives_its_ttl_or_the_floor(
    enforced: Enforced, policy_maps: KernelPolicy, dns: Path, listeners: dict[str, int]
) -> None:
    # TTL 1 with a floor of 2 s: 2 s; TTL 300: 300 s
    _, got = client(
        enforced.sandbox,
        [["query", "www.allowed.test", RESOLVER], ["query", "long.allowed.test", RESOLVER]],
    )
    assert got == ["127.0.0.89", "127.0.0.96"]
    now = time.monotonic_ns()
    learnt = policy_maps.learned(enforced.index)
    short = learnt[(AF_INET, socket.inet_aton("127.0.0.89") + bytes(12))][1] - now
    long = learnt[(AF_INET, socket.inet_aton("127.0.0.96") + bytes(12))][1] - now
    assert 1.0e9 < short <= 2.0e9
    assert 299.0e9 < long <= 300.0e9
    time.sleep(2.2)
    _, got = client(
        enforced.sandbox,
        [
            ["tcp", "127.0.0.89", PORT],  # expired
            ["tcp", "127.0.0.96", PORT],  # still allowed
            ["query", "www.allowed.test", RESOLVER],
            ["tcp", "127.0.0.89", PORT],  # learnt again
        ],
    )
    assert got == ["EEPERM", "ok", "127.0.0.89", "ok"]


def test_a_reload_keeps_what_both_policies_allow_and_drops_the_rest(
    enforced: Enforced, policy_maps: KernelPolicy, dns: Path, listeners: dict[str, int]
) -> None:
    _, got = client(
        enforced.sandbox,
        [["query", "long.allowed.test", RESOLVER], ["query", "a.cdn.test", RESOLVER]],
    )
    assert got == ["127.0.0.96", "127.0.0.91"]
    # *.cdn.test leaves the policy; long.allowed.test stays, and its learnt address with it
    name = enforced.sandbox.name
    smaller = EgressPolicy.parse(["long.allowed.test", "evil.test"], allow_loopback=False)
    smaller = dataclasses.replace(smaller, resolvers=(ipaddress.ip_address(RESOLVER),))
    enforced.enforcer.apply(EgressPolicies(per_sandbox={name: smaller}))
    _, got = client(
        enforced.sandbox,
        [
            ["tcp", "127.0.0.96", PORT],
            ["tcp", "127.0.0.91", PORT],
            ["query", "evil.test", RESOLVER],
            ["tcp", "127.0.0.90", PORT],
        ],
    )
    assert got == ["ok", "EEPERM", "127.0.0.90", "ok"]


RACE = r"""
import errno, json, socket, struct, sys
resolver, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
q = struct.pack("!HHHHHH", 0x4321, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes((len(p),)) + p.encode() for p in "spin.allowed.test".split(".")) + b"\0"
q += struct.pack("!HH", 1, 1)
d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
d.settimeout(5)
d.connect((resolver, 53))
counts = {"ok": 0}
seen = set()
for i in range(n):
    d.send(q)
    addr = socket.inet_ntoa(d.recv(512)[-4:])
    seen.add(addr)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((addr, port))  # the instant the answer is read
        counts["ok"] += 1
    except OSError as e:
        counts[errno.errorcode[e.errno]] = counts.get(errno.errorcode[e.errno], 0) + 1
    s.close()
counts["addresses"] = len(seen)
print(json.dumps(counts), flush=True)
"""


def test_resolve_then_connect_is_never_refused(
    enforcing: Tracer, policy_maps: KernelPolicy, dns: Path
) -> None:
    # The server answers each query with the next of ten addresses, TTL 1 s, and the floor
    # is 0: every connect goes to an address the answer just read made allowed.
    n = 10_000
    with enforcing.sandbox() as sb:
        index = [s.name for s in enforcing.assembler.scopes].index(sb.name)
        policy = dataclasses.replace(POLICY, resolvers=(ipaddress.ip_address(RESOLVER),))
        enforcer = Enforcer(policy_maps, {sb.name: index}, ttl_floor=0)
        enforcer.apply(EgressPolicies(per_sandbox={sb.name: policy}))
        before = policy_maps.denied()
        proc = sb.spawn([PYTHON, "-c", RACE, RESOLVER, "9", str(n)], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0
        counts = json.loads(out)
        after = policy_maps.denied()
    assert counts == {"ok": n, "addresses": len(ROTATING)}
    assert after == before  # not one denial counted in the kernel either


def test_the_longest_network_match_answers_for_every_network_containing_it(
    enforcing: Tracer, policy_maps: KernelPolicy
) -> None:
    # 127.0.0.64/26 is the longest match for .70, but the /24 around it allows port 80 there
    with enforcing.sandbox() as sb:
        index = [s.name for s in enforcing.assembler.scopes].index(sb.name)
        policy = EgressPolicy.parse(
            ["127.0.0.0/24:80", "127.0.0.64/26:443", "[::ffff:127.0.1.0/120]:8080"],
            allow_loopback=False,
        )
        Enforcer(policy_maps, {sb.name: index}).apply(EgressPolicies(per_sandbox={sb.name: policy}))
        _, got = client(
            Sandbox(enforcing, sb.cgroup),
            [
                ["udp_connect", "127.0.0.70", 80],
                ["udp_connect", "127.0.0.70", 443],
                ["udp_connect", "127.0.0.10", 443],
                ["udp_connect", "127.0.0.10", 80],
                ["udp_connect", "127.0.1.7", 8080],  # an IPv4-mapped network, as IPv4
                ["udp_connect", "127.0.1.7", 8081],
            ],
        )
    assert got == ["ok", "ok", "EEPERM", "ok", "ok", "EEPERM"]


def test_a_policy_the_kernel_cannot_hold_is_refused_and_the_old_one_stays(
    enforced: Enforced, dns: Path, listeners: dict[str, int]
) -> None:
    too_many = EgressPolicy.parse([f"n{i}.allowed.test" for i in range(65)], allow_loopback=False)
    with pytest.raises(EnforceError, match="65 names and 0 sets of network ports make 65 rules"):
        enforced.enforcer.apply(EgressPolicies(per_sandbox={enforced.sandbox.name: too_many}))
    _, got = client(
        enforced.sandbox,
        [
            ["query", "www.allowed.test", RESOLVER],
            ["tcp", "127.0.0.89", PORT],
            ["tcp", "127.0.0.90", PORT],
        ],
    )
    assert got == ["127.0.0.89", "ok", "EEPERM"]


def test_a_rule_bit_given_again_first_forgets_what_it_allowed(
    enforced: Enforced, policy_maps: KernelPolicy, dns: Path, listeners: dict[str, int]
) -> None:
    # www.allowed.test's rule learns 127.0.0.89; the policy then drops it, and a later
    # policy's new name gets a bit: never the one 127.0.0.89 still carries in the kernel
    name = enforced.sandbox.name
    resolvers = (ipaddress.ip_address(RESOLVER),)
    _, got = client(enforced.sandbox, [["query", "www.allowed.test", RESOLVER]])
    assert got == ["127.0.0.89"]
    key = (AF_INET, socket.inet_aton("127.0.0.89") + bytes(12))
    assert policy_maps.learned(enforced.index)[key][0] != 0
    for names in (["evil.test"], [f"n{i}.allowed.test" for i in range(64)]):
        policy = dataclasses.replace(
            EgressPolicy.parse(names, allow_loopback=False), resolvers=resolvers
        )
        enforced.enforcer.apply(EgressPolicies(per_sandbox={name: policy}))
    # every bit is in use by the 64 new names: 127.0.0.89's old rule bit was forgotten first
    assert key not in policy_maps.learned(enforced.index)
    _, got = client(enforced.sandbox, [["tcp", "127.0.0.89", PORT]])
    assert got == ["EEPERM"]


FLOOD = r"""
import errno, socket, sys
n, refused = int(sys.argv[1]), 0
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(n):
    try:
        s.connect(("127.0.0.90", 9))
    except PermissionError:
        refused += 1
print(refused, flush=True)
"""


def test_a_flood_of_refused_connects_is_counted_not_sent_one_by_one(
    enforced: Enforced, policy_maps: KernelPolicy, enforcing: Tracer
) -> None:
    n = 5000
    before = policy_maps.denied()["connect"]
    pid, out, _ = enforced.sandbox.python(FLOOD, str(n))
    assert int(out) == n
    assert policy_maps.denied()["connect"] - before == n
    time.sleep(1.1)  # the repeat window ends: the count left in the kernel is drained
    enforcing.probes.drain_repeats()
    enforcing.collect()
    floods = [
        e
        for e in of(enforced.sandbox.events(), "connect", pid)
        if (e.daddr, e.dport) == ("127.0.0.90", 9)
    ]
    assert all(e.denied for e in floods)
    sent = [e for e in floods if e.outcome == "denied"]
    # at most the window's budget sent one by one, every other one counted
    assert len(sent) <= 1024
    assert len(sent) + sum(e.repeats for e in floods) == n
