"""Names and protocols from the sandbox's own packets (cgroup_skb ingress and egress): DNS
answers a sandboxed process gets from a real DNS server (tests/e2e/services/dns_server.py)
over UDP and TCP become dns events and entries of the kernel's per-sandbox address -> name
map, and the process's connects carry the name it resolved and what each flow speaks,
whatever the port: Stratum, HTTP and its Host, TLS and its server name, SSH."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.events import ConnectEvent, DnsEvent
from collector.assemble import FLOW_HOLD_NS
from collector.dns import name_hash
from tests.kernel.dnsserver import dns_server as serve_dns
from tests.kernel.tracer import Tracer, of
from tests.tlsutil import make_tls

RESOLVER = "127.0.0.88"
ZONE = {
    "pool.example.test": {"CNAME": "edge.pools.test"},
    "edge.pools.test": {"A": ["127.0.0.90"], "TTL": 120},
    "www.example.test": {"A": ["127.0.0.89"], "TTL": 60},
}
LISTENERS = {
    "stratum": "127.0.0.90",
    "http": "127.0.0.89",
    "tls": "127.0.0.91",
    "ssh": "127.0.0.92",
}

CLIENT = r"""
import json, socket, ssl, struct, sys
resolver, ports = sys.argv[1], json.loads(sys.argv[2])

def query(name, qtype, tcp=False):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes((len(p),)) + p.encode() for p in name.split(".")) + b"\0"
    q += struct.pack("!HH", qtype, 1)
    if tcp:
        s = socket.create_connection((resolver, 53), 5)
        s.sendall(struct.pack("!H", len(q)) + q)
        n = struct.unpack("!H", s.recv(2))[0]
        data = b""
        while len(data) < n:
            data += s.recv(n - len(data))
        s.close()
        return data
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    s.sendto(q, (resolver, 53))
    data = s.recv(4096)
    s.close()
    return data

def last_a(reply):
    return socket.inet_ntoa(reply[-4:])

pool = last_a(query("Pool.Example.TEST", 1))
www = last_a(query("www.example.test", 1, tcp=True))
query("nope.example.test", 1)
s = socket.create_connection((pool, ports["stratum"]), 5)
s.sendall(b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"44wallet","pass":"x","agent":"XMRig/6.21.0"}}\n')
s.recv(100); s.close()
s = socket.create_connection((www, ports["http"]), 5)
s.sendall(b"GET /index.html HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: t\r\n\r\n")
s.recv(100); s.close()
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("127.0.0.91", ports["tls"]), 5)
t = ctx.wrap_socket(s, server_hostname="api.example.test")
t.close()
s = socket.create_connection(("127.0.0.92", ports["ssh"]), 5)
s.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n")
s.recv(100); s.close()
print("ok", flush=True)
"""


@pytest.fixture
def flows(tracer: Tracer) -> Iterator[None]:
    """Connects wait for their flows' first bytes, as `sandtrace run` has them."""
    assert tracer.probes.classifies_flows, "this kernel has every cgroup_skb hook"
    tracer.assembler.flow_hold_ns = FLOW_HOLD_NS
    try:
        yield
    finally:
        tracer.assembler.flow_hold_ns = 0


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[Path]:
    with serve_dns(ZONE, RESOLVER, tmp_path) as log:
        yield log


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, int]]:
    """A listener per protocol, each answering its first read with a line, the TLS one with
    a real handshake."""
    tls = make_tls(tmp_path, ["api.example.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    socks: dict[str, socket.socket] = {}
    stop = threading.Event()

    def serve(name: str, lsock: socket.socket) -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    if name == "tls":
                        ctx.wrap_socket(conn, server_side=True).close()
                    else:
                        conn.recv(4096)
                        conn.sendall(b"ok\n")
                except OSError:
                    pass

    for name, addr in LISTENERS.items():
        s = socket.socket()
        s.bind((addr, 0))
        s.listen()
        socks[name] = s
        threading.Thread(target=serve, args=(name, s), daemon=True).start()
    try:
        yield {name: s.getsockname()[1] for name, s in socks.items()}
    finally:
        stop.set()
        for s in socks.values():
            s.close()


def test_dns_answers_name_connects_and_flows_say_their_protocol(
    tracer: Tracer, flows: None, dns_server: Path, servers: dict[str, int]
) -> None:
    with tracer.sandbox() as sb:
        pid, out, _ = sb.python(CLIENT, RESOLVER, json.dumps(servers))
        index = len(tracer.assembler.scopes) - 1
        names = {
            (k.sandbox, bytes(k.addr[:4])): (v.name_hash, v.ttl)
            for k, v in tracer.probes.bpf[b"dns_names"].items()
        }
        events = tracer.wait_for(
            lambda evs: len([e for e in of(evs, "connect", pid) if e.dport != 53]) >= 4
        )
    assert out.split() == [b"ok"]
    dns = [e for e in of(events, "dns", pid) if isinstance(e, DnsEvent)]
    got = [
        (e.query_name, e.query_type, e.rcode_name, e.cnames, e.addresses, e.protocol) for e in dns
    ]
    assert got == [
        ("pool.example.test", "A", "NOERROR", ["edge.pools.test"], ["127.0.0.90"], "udp"),
        ("www.example.test", "A", "NOERROR", [], ["127.0.0.89"], "tcp"),
        ("nope.example.test", "A", "NXDOMAIN", [], [], "udp"),
    ]
    assert all(e.resolver == RESOLVER and e.resolver_port == 53 for e in dns)
    assert [e.mapped for e in dns] == [1, 1, 0]
    assert dns[0].answers == ["CNAME edge.pools.test", "A 127.0.0.90"]
    assert dns[0].ttl == 60  # the chain holds as long as its shortest-lived link
    # In the kernel, before the answer reached the process: the question's name, whatever
    # its case, for the sandbox the process is in.
    assert names[(index, socket.inet_aton("127.0.0.90"))] == (name_hash("pool.example.test"), 120)
    assert names[(index, socket.inet_aton("127.0.0.89"))] == (name_hash("www.example.test"), 60)

    connects = {
        e.daddr: e
        for e in of(events, "connect", pid)
        if isinstance(e, ConnectEvent) and e.dport != 53
    }
    stratum = connects["127.0.0.90"]
    assert (stratum.hostname, stratum.hostname_source) == ("pool.example.test", "dns")
    assert (stratum.app_protocol, stratum.app_detail) == ("stratum", "login")
    assert stratum.outcome == "success"
    http = connects["127.0.0.89"]
    assert (http.hostname, http.app_protocol, http.http_host) == (
        "www.example.test",
        "http",
        "www.example.test",
    )
    assert http.app_detail == "GET /index.html HTTP/1.1"
    tls = connects["127.0.0.91"]
    assert (tls.app_protocol, tls.sni) == ("tls", "api.example.test")
    assert (tls.hostname, tls.hostname_source) == ("api.example.test", "sni")
    ssh = connects["127.0.0.92"]
    assert (ssh.app_protocol, ssh.hostname) == ("ssh", "")
    assert ssh.app_detail == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    # DNS's own flows: the UDP queries are sent without connect()
    to_resolver = [e for e in of(events, "connect", pid) if e.dport == 53]
    assert to_resolver and all(e.app_protocol == "dns" for e in to_resolver)
