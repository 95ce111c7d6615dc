"""What enforcement costs (`--enforce`), in alternating rounds, each the fastest of its kind:

- a sandboxed UDP connect (the connect4 hook's verdict: an LPM lookup, a learnt-address
  lookup, the port check) and an unconnected sendto (the egress program's verdict), with the
  probes loaded without enforcement and with it;
- a host connect, outside every sandbox: the same two loads (the enforcing programs are on
  the sandbox cgroup only, so it should not move);
- a DNS answer received by a sandboxed socket from its resolver, for a name of its policy:
  the parse, the allowed-names lookups and the address learnt, per answer, measured on the
  sender (loopback delivery runs the receiver's ingress program in the sender's syscall).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import Row, micro
from collector import cgroups
from collector.enforce import Enforcer
from detect.egress import EgressPolicies, EgressPolicy
from probes import kernel
from probes.loader import ProbeConfig, Probes

RESOLVER = "127.0.0.77"
RECEIVER_PORT = 18053
OPS = {"connect": 300_000, "sendto": 100_000}
ANSWERS = 100_000
RECEIVER = (
    "import socket, sys, time\n"
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"s.bind(('127.0.0.1', {RECEIVER_PORT}))\n"
    "print('ready', flush=True)\n"
    "time.sleep(3600)\n"
)


@contextmanager
def _loaded(
    features: kernel.KernelFeatures, sandbox: cgroups.SandboxCgroup, enforce: bool
) -> Iterator[Probes]:
    probes = Probes(ProbeConfig(enforce=enforce), features)
    try:
        if enforce:
            # 127.0.0.1 port 9 (micro's destination) by network; the answers' name by name
            policy = EgressPolicy.parse(
                ["127.0.0.1/32:9", "www.example.test:443"], allow_loopback=False
            )
            policy = dataclasses.replace(policy, resolvers=(ipaddress.ip_address(RESOLVER),))
            Enforcer(probes.policy(), {sandbox.name: 0}).apply(
                EgressPolicies(per_sandbox={sandbox.name: policy})
            )
        probes.trace_cgroup(sandbox.path, 0)
        probes.start(lambda: None)
        yield probes
    finally:
        probes.close()


def _answers(exe: Path, sandbox: cgroups.SandboxCgroup) -> float:
    """ns per DNS answer sent to a socket made in the sandbox (made while the probes are
    loaded: its maker is known by socket cookie)."""
    receiver = subprocess.Popen(
        ["/usr/bin/python3", "-c", RECEIVER],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=sandbox.join,  # noqa: PLW1509 - no other thread forks meanwhile
    )
    try:
        if receiver.stdout is None or receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("the sandboxed receiver did not start")
        return micro(exe, "dns-answers", ANSWERS, RESOLVER, RECEIVER_PORT)
    finally:
        receiver.kill()
        receiver.wait()
        if receiver.stdout is not None:
            receiver.stdout.close()


def enforce_costs(
    exe: Path, features: kernel.KernelFeatures, sandbox: cgroups.SandboxCgroup, rounds: int
) -> list[Row]:
    results: dict[str, dict[bool, list[float]]] = {}

    def add(key: str, enforce: bool, value: float) -> None:
        results.setdefault(key, {False: [], True: []})[enforce].append(value)

    for r in range(rounds):
        for enforce in (False, True):
            with _loaded(features, sandbox, enforce):
                for op, n in OPS.items():
                    name = "UDP connect" if op == "connect" else op
                    add(f"sandbox {name}", enforce, micro(exe, op, n, sandbox=sandbox))
                add("host UDP connect", enforce, micro(exe, "connect", OPS["connect"]))
                add("sandbox DNS answer", enforce, _answers(exe, sandbox))
        print(f"bench: enforce: round {r + 1}/{rounds}", flush=True)
    rows: list[Row] = []
    for key, by in results.items():
        b, w = min(by[False]), min(by[True])
        rows.append((f"{key} (ns), enforce off->on", f"{b:.0f}", f"{w:.0f}", f"{w / b:.3f}x"))
    return rows
