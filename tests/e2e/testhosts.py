"""Test hosts for end-to-end scenarios, in network namespaces this suite creates itself.

Topology (`make_testnet`): namespace `inside` (where the sandboxed command runs, through
`ip netns exec`) and namespace `outside` (the test hosts), joined by one veth pair:

    inside  198.51.100.2/24                  routes: 198.51.100.0/24 on-link,
                                                     203.0.113.0/24 via 198.51.100.1
    outside 198.51.100.1/24, 203.0.113.10/24, 198.51.100.20-29/24 (no listeners: RST)

Neither namespace has a default route or any link to the host, so nothing can leave them.
Services (`run_sshd`, `run_mining_pool`, `run_http_host`, `run_dns_server`) run inside
`outside` (on the ports the scenario names, the usual ones unless told), each waits
until it really listens (`ss` in the namespace) and each is stopped and its temporary
directory removed on exit, also when the body raises. `make_testnet` kills every process
still left in either namespace (a backgrounded `ssh -f`, a session sshd) before deleting
the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2 import NetNS as NetNSHandle

PYTHON = "/usr/bin/python3"  # Debian's interpreter: stdlib only, no pyenv shim in the way
SERVICES_DIR = Path(__file__).resolve().parent / "services"
POOL_SCRIPT = SERVICES_DIR / "pool.py"
MINER_SCRIPT = SERVICES_DIR / "miner.py"
HTTP_SCRIPT = SERVICES_DIR / "http_server.py"
DNS_SCRIPT = SERVICES_DIR / "dns_server.py"
SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT = 10.0

Endpoint = tuple[str, int]


def netns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is `ns` (empty when it does not exist)."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def kill_netns_processes(ns: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in namespace `ns` until none is left."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(ns):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survived SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def listening(ns: str, proto: str = "tcp") -> set[Endpoint]:
    """Local (address, port) of every listening socket in namespace `ns`."""
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ss", flag], capture_output=True, text=True, check=True
    ).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[3]
        addr, _, port = local.rpartition(":")
        found.add((addr.strip("[]"), int(port)))
    return found


def wait_listening(
    ns: str,
    endpoints: Iterable[Endpoint],
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Return once every endpoint listens in `ns`; raise early if `proc` died."""
    wanted = set(endpoints)
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - listening(ns)
        if not missing:
            return
        detail = f"\n--- log ---\n{log.read_text(errors='replace')}" if log else ""
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}{detail}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sorted(missing)} not listening in {ns} after {timeout}s{detail}")
        time.sleep(0.02)


def wait_not_listening(ns: str, endpoint: Endpoint, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while endpoint in listening(ns):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{endpoint} still listening in {ns} after {timeout}s")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def service(
    ns: str, argv: list[str], log: Path, endpoints: Iterable[Endpoint]
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in namespace `ns` (output to `log`) until it listens; stop it on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(ns, endpoints, proc, log)
        yield proc
    finally:
        stop(proc)


# --- topology ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NetNS:
    """The two namespaces of one test and their addresses (all from documentation ranges)."""

    inside: str
    outside: str
    inside_dev: str = ""
    outside_dev: str = ""
    inside_addr: str = "198.51.100.2"
    outside_addr: str = "198.51.100.1"
    far_addr: str = "203.0.113.10"  # on outside, reached from inside through 198.51.100.1
    probe_addrs: tuple[str, ...] = tuple(f"198.51.100.{i}" for i in range(20, 30))

    def in_inside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.inside, *argv]

    def in_outside(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.outside, *argv]

    def listening_outside(self) -> set[Endpoint]:
        return listening(self.outside)

    def listening_inside(self) -> set[Endpoint]:
        return listening(self.inside)

    def shell_catcher(self, port: int, typed: str, hangup_s: int) -> subprocess.Popen[bytes]:
        """A listener on the outside host, as a reverse shell's operator has: it types
        `typed` into the first connection, hangs up `hangup_s` seconds after its input ends,
        and is listening when this returns."""
        proc = subprocess.Popen(
            self.in_outside(
                "sh", "-c", f"echo '{typed}' | nc -l -q {hangup_s} {self.outside_addr} {port}"
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while (self.outside_addr, port) not in self.listening_outside():
            assert time.monotonic() < deadline, "listener did not start"
            time.sleep(0.02)
        return proc


@contextlib.contextmanager
def make_testnet() -> Iterator[NetNS]:
    tag = secrets.token_hex(3)
    net = NetNS(
        inside=f"st-in-{tag}",
        outside=f"st-out-{tag}",
        inside_dev=f"vi{tag}",
        outside_dev=f"vo{tag}",
    )
    made: list[str] = []
    try:
        # Built with pyroute2 (netlink), as sandtrace itself talks to the kernel.
        for ns in (net.inside, net.outside):
            netns.create(ns)
            made.append(ns)
        with IPRoute() as host:
            host.link(
                "add",
                ifname=net.inside_dev,
                kind="veth",
                peer={"ifname": net.outside_dev, "net_ns_fd": net.outside},
            )
            (index,) = host.link_lookup(ifname=net.inside_dev)
            host.link("set", index=index, net_ns_fd=net.inside)
        outside_addrs = (net.outside_addr, net.far_addr, *net.probe_addrs)
        for ns, dev, addrs in (
            (net.inside, net.inside_dev, (net.inside_addr,)),
            (net.outside, net.outside_dev, outside_addrs),
        ):
            with NetNSHandle(ns) as handle:
                (index,) = handle.link_lookup(ifname=dev)
                for addr in addrs:
                    handle.addr("add", index=index, address=addr, prefixlen=24)
                handle.link("set", index=index, state="up")
                (lo,) = handle.link_lookup(ifname="lo")
                handle.link("set", index=lo, state="up")
                if ns == net.inside:
                    handle.route("add", dst="203.0.113.0/24", gateway=net.outside_addr)
        yield net
    finally:
        for ns in made:
            with contextlib.suppress(RuntimeError):
                kill_netns_processes(ns)
            with contextlib.suppress(OSError):
                netns.remove(ns)


# --- sshd ----------------------------------------------------------------------------------

SSHD_CONFIG = """\
ListenAddress {addr}:{port}
ListenAddress {alt_addr}:{alt_port}
HostKey {dir}/ssh_host_ed25519_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile {dir}/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding yes
GatewayPorts no
UsePAM no
StrictModes no
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
"""

# sshd insists on its privilege separation directory /run/sshd, which a machine without a
# running sshd lacks. `ip netns exec` gives the command a private mount namespace, so an
# overlay on /run there provides the directory without touching the host.
SSHD_LAUNCH = (
    'mkdir -p "$1/run-up" "$1/run-work" && '
    'mount -t overlay sandtrace-run -o "lowerdir=/run,upperdir=$1/run-up,workdir=$1/run-work" '
    "/run && mkdir -p -m 0755 /run/sshd && "
    'exec "$2" -D -e -f "$1/sshd_config"'
)


@dataclass(frozen=True)
class SshServer:
    """A real OpenSSH sshd in `outside`, accepting `client_key` for root."""

    dir: Path
    client_key: Path
    pid: int
    addr: str = "198.51.100.1"
    port: int = 22
    alt_addr: str = "203.0.113.10"
    alt_port: int = 2222
    user: str = "root"

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.addr}"

    @property
    def alt_destination(self) -> str:
        return f"{self.user}@{self.alt_addr}"

    def client_argv(self) -> list[str]:
        """`ssh` plus the options that log in with the test key and trust any host key."""
        return [
            "ssh",
            "-F",
            "none",  # no user or system client config
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            "-o",
            "LogLevel=ERROR",
        ]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_sshd(net: NetNS, port: int = 22) -> Iterator[SshServer]:
    """sshd on 198.51.100.1:`port` (22 unless told) and 203.0.113.10:2222."""
    if not SSHD.exists():
        raise RuntimeError(f"{SSHD} is missing: apt-get install openssh-server")
    with temp_dir("st-sshd-") as d:
        for key in ("ssh_host_ed25519_key", "client_ed25519"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
                check=True,
                capture_output=True,
            )
        shutil.copyfile(d / "client_ed25519.pub", d / "authorized_keys")
        server = SshServer(dir=d, client_key=d / "client_ed25519", pid=0, port=port)
        config = SSHD_CONFIG.format(
            addr=server.addr,
            port=server.port,
            alt_addr=server.alt_addr,
            alt_port=server.alt_port,
            dir=d,
        )
        server.config.write_text(config)
        argv = ["sh", "-c", SSHD_LAUNCH, "sshd-launch", str(d), str(SSHD)]
        endpoints = [(server.addr, server.port), (server.alt_addr, server.alt_port)]
        with service(net.outside, argv, server.log, endpoints) as proc:
            yield SshServer(dir=d, client_key=server.client_key, pid=proc.pid, port=port)


# --- mining pool ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MiningPool:
    """`services/pool.py` in `outside`; every request it got is a line in `log`."""

    dir: Path
    pid: int
    addr: str = "198.51.100.1"
    port: int = 3333

    @property
    def log(self) -> Path:
        return self.dir / "pool.jsonl"

    @property
    def url(self) -> str:
        return f"stratum+tcp://{self.addr}:{self.port}"

    def requests(self) -> list[dict[str, Any]]:
        """Records `{"ts": float, "peer": "IP:PORT", "request": {...}}`, in arrival order."""
        return read_jsonl(self.log)

    def wallets(self) -> list[str]:
        """The user of every `login` (xmrig) and `mining.authorize` (stratum v1) request."""
        found = []
        for rec in self.requests():
            req = rec["request"]
            if req.get("method") == "login":
                found.append(str(req["params"]["login"]))
            elif req.get("method") == "mining.authorize":
                found.append(str(req["params"][0]))
        return found


@contextlib.contextmanager
def run_mining_pool(net: NetNS, port: int = 3333) -> Iterator[MiningPool]:
    """The pool on 198.51.100.1:`port` (3333 unless told)."""
    with temp_dir("st-pool-") as d:
        pool = MiningPool(dir=d, pid=0, port=port)
        argv = [
            PYTHON,
            str(POOL_SCRIPT),
            "--host",
            pool.addr,
            "--port",
            str(pool.port),
            "--log",
            str(pool.log),
        ]
        with service(net.outside, argv, d / "pool.out", [(pool.addr, pool.port)]) as proc:
            yield MiningPool(dir=d, pid=proc.pid, port=port)


def install_miner(dest: Path) -> Path:
    """Copy `services/miner.py` to `dest` (any name, e.g. /tmp/.cache/x), executable."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MINER_SCRIPT, dest)
    dest.chmod(dest.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return dest


# --- HTTP ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpHost:
    """`services/http_server.py` in `outside`, serving the files in `root`."""

    dir: Path
    pid: int
    addr: str = "198.51.100.1"
    port: int = 8000
    scheme: str = "http"  # "https" when it serves over TLS

    @property
    def root(self) -> Path:
        return self.dir / "www"

    @property
    def log(self) -> Path:
        return self.dir / "http.jsonl"

    def url(self, name: str) -> str:
        return f"{self.scheme}://{self.addr}:{self.port}/{name.lstrip('/')}"

    def put(self, name: str, content: str | bytes, mode: int = 0o644) -> str:
        """Serve `content` as `name`; return its URL."""
        path = self.root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = content.encode() if isinstance(content, str) else content
        path.write_bytes(data)
        path.chmod(mode)
        return self.url(name)

    def requests(self) -> list[dict[str, Any]]:
        """Records `{"ts", "client", "method", "path", "status", "user_agent"}`, in order."""
        return read_jsonl(self.log)


@contextlib.contextmanager
def run_http_host(
    net: NetNS, port: int = 8000, tls: tuple[Path, Path] | None = None
) -> Iterator[HttpHost]:
    """The HTTP host on 198.51.100.1:`port` (8000 unless told); over TLS with `tls`, a
    (certificate, key) pair of PEM files."""
    with temp_dir("st-http-") as d:
        scheme = "https" if tls else "http"
        host = HttpHost(dir=d, pid=0, port=port, scheme=scheme)
        host.root.mkdir()
        argv = [
            PYTHON,
            str(HTTP_SCRIPT),
            "--bind",
            host.addr,
            "--port",
            str(host.port),
            "--directory",
            str(host.root),
            "--log",
            str(host.log),
        ]
        if tls:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        with service(net.outside, argv, d / "http.out", [(host.addr, host.port)]) as proc:
            yield HttpHost(dir=d, pid=proc.pid, port=port, scheme=scheme)


# --- DNS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DnsServer:
    """`services/dns_server.py` in `outside`, authoritative for the test's zone; the resolver
    of every program run in `inside` through `ip netns exec` while it runs."""

    dir: Path
    pid: int
    addr: str = "198.51.100.1"
    port: int = 53

    @property
    def log(self) -> Path:
        return self.dir / "queries.jsonl"

    def queries(self) -> list[dict[str, Any]]:
        """Records `{"ts", "peer", "proto", "name", "type"}`, in arrival order."""
        return read_jsonl(self.log)


@contextlib.contextmanager
def run_dns_server(net: NetNS, zone: dict[str, Any]) -> Iterator[DnsServer]:
    """Serve `zone` (see services/dns_server.py) on 198.51.100.1:53, UDP and TCP, and make it
    the resolver of `inside`: `ip netns exec` binds the files of /etc/netns/NAME over /etc,
    so the namespace's own resolv.conf names this server and nothing else (the host's
    resolver is unreachable from the namespace anyway)."""
    etc = Path("/etc/netns") / net.inside
    with temp_dir("st-dns-") as d:
        server = DnsServer(dir=d, pid=0)
        (d / "zone.json").write_text(json.dumps(zone))
        argv = [
            PYTHON,
            str(DNS_SCRIPT),
            "--bind",
            server.addr,
            "--port",
            str(server.port),
            "--zone",
            str(d / "zone.json"),
            "--log",
            str(server.log),
        ]
        made_parent = not etc.parent.exists()
        etc.mkdir(parents=True)
        try:
            (etc / "resolv.conf").write_text(
                f"nameserver {server.addr}\noptions timeout:2 attempts:1\n"
            )
            endpoints = [(server.addr, server.port)]
            with service(net.outside, argv, d / "dns.out", endpoints) as proc:
                yield DnsServer(dir=d, pid=proc.pid)
        finally:
            shutil.rmtree(etc, ignore_errors=True)
            if made_parent:
                with contextlib.suppress(OSError):
                    etc.parent.rmdir()  # unless another test's namespace has files there
