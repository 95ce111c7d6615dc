"""Names and protocols in user space: DNS messages parsed whole (untrusted: fuzzed), the
details of a flow's first bytes (a real ClientHello from Python's ssl), and the assembly of
dns and flow records into dns events and connects that carry a name and a protocol."""

from __future__ import annotations

import contextlib
import ssl
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from api.events import ConnectEvent, DnsEvent, Process, decode, encode
from api.render import TextRenderer
from collector import dns, flows
from collector import records as R
from collector.assemble import Assembler, Scope

_LAYOUTS = {cls: R.layout(cls) for cls in R.RECORD_CLASSES.values()}


def record(cls: type[Any], **values: Any) -> bytes:
    """A record's bytes as the kernel writes them: every field 0 unless given."""
    fixed = _LAYOUTS[cls]
    names = list(fixed.codes)
    defaults: dict[str, Any] = {n: b"" if fixed.codes[n].endswith("s") else 0 for n in names}
    rtype = next(t for t, c in R.RECORD_CLASSES.items() if c is cls)
    defaults.update(type=rtype, version=R.LAYOUT_VERSION, size=fixed.struct.size, pid=77)
    defaults.update(start_ns=5, comm=b"client", ktime_ns=1_000_000_000)
    defaults.update(values)
    return fixed.struct.pack(*(defaults[n] for n in names))


def wire(name: str) -> bytes:
    return dns.wire_name(name) + b"\0"


def response(
    qname: str, answers: list[bytes], rcode: int = 0, qtype: int = 1, flags: int = 0x8180
) -> bytes:
    head = struct.pack("!HHHHHH", 0x4242, flags | rcode, 1, len(answers), 0, 0)
    return head + wire(qname) + struct.pack("!HH", qtype, 1) + b"".join(answers)


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata


CHAIN = response(
    "Pool.Example.test",
    [
        rr(b"\xc0\x0c", 5, 300, wire("edge.cdn.test")),
        # the CNAME's target is at 12 + question (23) + owner/fixed (12) = 47
        rr(b"\xc0\x2f", 1, 30, bytes([198, 51, 100, 7])),
        rr(b"\xc0\x2f", 28, 30, bytes.fromhex("20010db8000000000000000000000007")),
        rr(wire("elsewhere.test"), 1, 30, bytes([203, 0, 113, 9])),  # not the question's
    ],
)


def test_a_cname_chain_is_followed_and_pointers_read() -> None:
    msg = dns.parse(CHAIN)
    assert (msg.query_name, msg.query_type, msg.rcode, msg.response) == (
        "pool.example.test",
        "A",
        0,
        True,
    )
    assert msg.chain() == ["pool.example.test", "edge.cdn.test"]
    assert msg.addresses == ["198.51.100.7", "2001:db8::7"]
    assert msg.min_ttl() == 30


def test_nxdomain_and_odd_messages() -> None:
    nx = dns.parse(response("nope.test", [], rcode=3))
    assert (nx.rcode, dns.rcode_name(nx.rcode), nx.addresses) == (3, "NXDOMAIN", [])
    # a pointer that points forward (or at itself) is refused, not followed
    loop = response("a.test", [rr(b"\xc0\x40", 1, 1, b"\x01\x02\x03\x04")])
    try:
        dns.parse(loop)
    except dns.DnsError as exc:
        assert "does not point back" in str(exc)
    else:
        raise AssertionError("a forward pointer was followed")
    # an answer section cut by the capture keeps the answers before the cut
    cut = dns.parse(CHAIN[: len(CHAIN) - 10])
    assert cut.addresses == ["198.51.100.7", "2001:db8::7"]
    # labels that are not UTF-8 are kept, escaped
    odd = dns.parse(response("x.test", [])[:12] + b"\x02\xff\x1b\x00\x00\x01\x00\x01")
    assert odd.query_name == "\\xff\x1b"


def test_the_name_hash_is_the_kernels() -> None:
    # each label FNV-1a 64 alone (its length byte and its bytes, ASCII lowered), the labels
    # folded from the last: h = (h ^ label) * prime (bpf/include/flows.h, dns_name_hash)
    def fnv(data: bytes, h: int = 0xCBF29CE484222325) -> int:
        for c in data:
            h = ((h ^ c) * 0x100000001B3) & (2**64 - 1)
        return h

    def fold(labels: list[bytes]) -> int:
        h = 0xCBF29CE484222325
        for label in reversed(labels):
            h = ((h ^ fnv(label)) * 0x100000001B3) & (2**64 - 1)
        return h

    h = fold([b"\x04pool", b"\x07example", b"\x04test"])
    assert dns.name_hash("POOL.example.Test.") == dns.name_hash("pool.example.test") == h
    # each domain above the name is a step on the way (the kernel's wildcard lookups)
    assert dns.name_hash("example.test") == fold([b"\x07example", b"\x04test"])
    assert dns.name_hash("test") == fold([b"\x04test"])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_dns_error(data: bytes) -> None:
    try:
        msg = dns.parse(data)
    except dns.DnsError:
        return
    assert all(len(a.name) <= 4 * 255 for a in msg.answers)
    msg.chain()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, len(CHAIN)))
def test_mangled_answers_parse_or_raise_dns_error(junk: bytes, at: int) -> None:
    with contextlib.suppress(dns.DnsError):
        dns.parse(CHAIN[:at] + junk + CHAIN[at:])


def client_hello(server_name: str) -> bytes:
    """The first bytes a real TLS client sends (Python's ssl, no socket)."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_details_of_first_bytes() -> None:
    hello = client_hello("api.example.test")
    assert flows.tls_server_name(hello) == "api.example.test"
    assert flows.tls_server_name(hello[:60]) == ""  # cut before the extension
    get = b"GET /simple/ HTTP/1.1\r\nUser-Agent: pip\r\nHOST: Index.Example.test:3141\r\n\r\n"
    assert flows.http_host(get) == "index.example.test:3141"
    assert flows.http_request_line(get) == "GET /simple/ HTTP/1.1"
    assert flows.http_host(b"CONNECT pool.test:443 HTTP/1.1\r\n\r\n") == "pool.test:443"
    login = b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"login":"w"}}\n'
    assert flows.stratum_method(login) == "login"
    assert flows.stratum_method(b'{"id": 2, "method": "mining.subscribe", "params": [') == (
        "mining.subscribe"
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_first_bytes_give_text(data: bytes) -> None:
    for detail in (flows.tls_server_name, flows.http_host, flows.stratum_method):
        value = detail(data)
        assert isinstance(value, str) and len(value) <= 4 * 255
    hello = client_hello("h.test")
    assert isinstance(flows.tls_server_name(hello[:50] + data), str)


def assembler(hold_ns: int = 100_000_000) -> Assembler:
    return Assembler([Scope("sb", ["/"])], lambda _i: "/sb", lambda _p: "", flow_hold_ns=hold_ns)


def dns_record(msg: bytes, **values: Any) -> bytes:
    return record(
        R.DnsRecord,
        server=bytes([192, 0, 2, 53]) + bytes(12),
        family=2,
        server_port=53,
        protocol=17,
        payload_size=len(msg),
        payload_full=len(msg),
        payload=msg,
        mapped=2,
        **values,
    )


def connect_record(cookie: int, addr: bytes, port: int, **values: Any) -> bytes:
    return record(
        R.ConnectRecord,
        **{"sock_type": 1, "protocol": 6} | values,
        cookie=cookie,
        daddr=addr + bytes(12),
        family=2,
        dport=port,
    )


def tcp_state(cookie: int, old: int, new: int, at: int) -> bytes:
    return record(
        R.TcpStateRecord, cookie=cookie, family=2, oldstate=old, newstate=new, ktime_ns=at
    )


def flow_record(cookie: int, app: int, payload: bytes, ingress: bool = False, at: int = 0) -> bytes:
    return record(
        R.FlowRecord,
        cookie=cookie,
        family=2,
        protocol=6,
        app=app,
        flags=R.FLOW_F_INGRESS if ingress else 0,
        payload_size=len(payload),
        payload_full=len(payload),
        payload=payload,
        ktime_ns=at or 1_000_000_000,
    )


def feed(asm: Assembler, *bufs: bytes) -> list[Any]:
    events, errors = asm.feed_batches([list(bufs)])
    assert errors == []
    return events


def test_a_connect_carries_the_name_resolved_and_what_its_flow_speaks() -> None:
    asm = assembler()
    [ev] = feed(asm, dns_record(CHAIN))
    assert isinstance(ev, DnsEvent)
    assert (ev.query_name, ev.rcode_name, ev.cnames, ev.addresses, ev.mapped) == (
        "pool.example.test",
        "NOERROR",
        ["edge.cdn.test"],
        ["198.51.100.7", "2001:db8::7"],
        2,
    )
    assert ev.answers[0] == "CNAME edge.cdn.test" and ev.resolver == "192.0.2.53"
    assert decode(encode(ev)) == ev
    # the connect waits for its handshake, then for its first bytes
    assert feed(asm, connect_record(9, bytes([198, 51, 100, 7]), 443)) == []
    assert feed(asm, tcp_state(9, 2, 1, 1_001_000_000)) == []
    login = b'{"id":1,"jsonrpc":"2.0","method":"login","params":{}}\n'
    [conn] = feed(asm, flow_record(9, R.APP_STRATUM, login, at=1_002_000_000))
    assert isinstance(conn, ConnectEvent)
    assert (conn.hostname, conn.hostname_source, conn.app_protocol, conn.app_detail) == (
        "pool.example.test",
        "dns",
        "stratum",
        "login",
    )
    assert conn.outcome == "success"
    # without an answer for its address, a TLS flow is named by its ClientHello
    feed(asm, connect_record(10, bytes([203, 0, 113, 5]), 8443), tcp_state(10, 2, 1, 1))
    [tls] = feed(asm, flow_record(10, R.APP_TLS, client_hello("Api.Example.test")))
    assert (tls.hostname, tls.hostname_source, tls.sni) == (
        "api.example.test",
        "sni",
        "api.example.test",
    )


def test_a_silent_flow_goes_out_after_the_hold_and_names_expire() -> None:
    asm = assembler()
    feed(asm, connect_record(11, bytes([198, 51, 100, 8]), 22), tcp_state(11, 2, 1, 2_000_000_000))
    assert asm.expire(2_050_000_000) == []
    [ev] = asm.expire(2_100_000_000)
    assert isinstance(ev, ConnectEvent)
    assert (ev.outcome, ev.app_protocol) == ("success", "")
    # without the hold (no flow hooks), connects go at once
    plain = assembler(hold_ns=0)
    feed(plain, dns_record(CHAIN))
    [ev] = feed(plain, connect_record(1, bytes([198, 51, 100, 7]), 443), tcp_state(1, 2, 1, 1))
    assert ev.hostname == "pool.example.test"
    # an answer names its addresses for its TTL, at least DNS_NAME_MIN_KEEP_NS
    late = 1_000_000_000 + 301_000_000_000
    assert feed(plain, connect_record(2, bytes([198, 51, 100, 7]), 443, ktime_ns=late)) == []
    [ev] = feed(plain, tcp_state(2, 2, 1, late + 1))
    assert ev.hostname == ""


def test_an_unreadable_answer_is_an_event_that_says_why() -> None:
    [ev] = feed(assembler(), dns_record(b"\x00\x01\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00\x05ab"))
    assert ev.query_name == "" and "past the message's end" in ev.error


def test_dns_and_connect_lines_escape_what_the_server_chose() -> None:
    common: dict[str, Any] = {
        "time_ns": 0,
        "mono_ns": 0,
        "host": "h",
        "sandbox": "sb",
        "cgroup_id": 1,
        "cgroup_path": "/sb",
        "container_id": "",
        "process": Process(
            pid=1, tid=1, ns_pid=1, ppid=0, uid=0, gid=0, comm=b"c", start_ns=1, key="1@1"
        ),
    }
    dev = DnsEvent(
        **common,
        query_name="evil\x1b[31m.test",
        query_type="A",
        rcode_name="NOERROR",
        addresses=["192.0.2.1"],
        resolver="192.0.2.53",
        resolver_port=53,
        protocol="udp",
    )
    line = TextRenderer(False, width=None).line(dev)
    assert "\x1b" not in line
    assert "evil\\x1b[31m.test A NOERROR -> 192.0.2.1 via 192.0.2.53:53/udp" in line
    conn = ConnectEvent(
        **common,
        protocol="tcp",
        family="ipv4",
        daddr="192.0.2.1",
        dport=443,
        outcome="success",
        hostname="pool.example.test",
        app_protocol="stratum",
    )
    line = TextRenderer(False, width=None).line(conn)
    assert "tcp 192.0.2.1:443 (pool.example.test) stratum success" in line


def test_an_exec_lets_the_connects_its_lineage_made_out_first() -> None:
    # A connect waits for its flow's first bytes; an exec of its process or of a descendant
    # (a relay that becomes sh; a shell forked onto a pty) must not overtake it: rules that
    # follow a connect with the shell after it see the events in the order they happened.
    asm = assembler()
    pool = bytes([198, 51, 100, 7])
    assert feed(asm, connect_record(9, pool, 4450), tcp_state(9, 2, 1, 1_001_000_000)) == []
    out = feed(asm, record(R.ExecRecord, pid=77, ppid=1, ktime_ns=1_002_000_000))
    assert [(type(e).__name__, e.process.pid) for e in out] == [
        ("ConnectEvent", 77),
        ("ExecEvent", 77),
    ]
    assert (out[0].outcome, out[0].app_protocol) == ("success", "")  # no byte came before
    # the parent's connect, then a child's exec
    feed(asm, connect_record(10, pool, 4451, pid=77), tcp_state(10, 2, 1, 1_003_000_000))
    [fork] = feed(asm, record(R.ForkRecord, pid=77, child_pid=78, child_start_ns=9))
    assert fork.child_pid == 78
    out = feed(asm, record(R.ExecRecord, pid=78, ppid=77, start_ns=9, ktime_ns=1_004_000_000))
    assert [(type(e).__name__, e.process.pid) for e in out] == [
        ("ConnectEvent", 77),
        ("ExecEvent", 78),
    ]
    # an exec elsewhere (not the connecting process or its descendant) leaves it waiting
    feed(asm, connect_record(11, pool, 443, pid=77), tcp_state(11, 2, 1, 1_005_000_000))
    [other] = feed(asm, record(R.ExecRecord, pid=90, ppid=1, ktime_ns=1_006_000_000))
    assert other.process.pid == 90
    hello = client_hello("api.example.test")
    [conn] = feed(asm, flow_record(11, R.APP_TLS, hello, at=1_007_000_000))
    assert (conn.process.pid, conn.app_protocol) == (77, "tls")


def test_a_datagram_socket_that_connects_again_releases_the_connect_held_before() -> None:
    """A UDP socket connecting every millisecond and never sending: each connect waits for
    its first bytes only until the socket connects again (those bytes would be the next
    one's), not a whole hold; the last waits the hold, then goes out."""
    asm = assembler()
    udp = {"sock_type": 2, "protocol": 17}
    ms = 1_000_000
    got: list[Any] = []
    for i in range(5):
        got += feed(asm, connect_record(21, bytes([192, 0, 2, 9]), 9, ktime_ns=i * ms, **udp))
    assert [e.mono_ns for e in got] == [0, ms, 2 * ms, 3 * ms]  # each on the next's arrival
    assert all(e.outcome == "success" and e.protocol == "udp" for e in got)
    assert asm.expire(4 * ms + 99 * ms) == []
    [last] = asm.expire(4 * ms + 100 * ms)
    assert isinstance(last, ConnectEvent) and last.mono_ns == 4 * ms
    # bytes after a connect are that connect's, not the one before it
    first = feed(asm, connect_record(22, bytes([192, 0, 2, 10]), 53, ktime_ns=ms, **udp))
    second = feed(asm, connect_record(22, bytes([192, 0, 2, 11]), 53, ktime_ns=2 * ms, **udp))
    [named] = feed(asm, flow_record(22, R.APP_DNS, b"\x12\x34\x01\x00", at=3 * ms))
    assert first == [] and [e.daddr for e in second] == ["192.0.2.10"]
    assert second[0].app_protocol == "" and named.daddr == "192.0.2.11"
    assert named.app_protocol == "dns"
