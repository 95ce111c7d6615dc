"""DNS messages a sandbox received, parsed whole: names, answers, CNAME chains, rcode.

The kernel parses answers only as far as its address -> name map needs (bpf/include/flows.h)
and hands the message over as it came; here it is read completely. Everything in it is
untrusted (a sandboxed process may run its own resolver): every length is checked against
the bytes present, compression pointers may only point backwards and are followed a bounded
number of times, and a malformed message raises DnsError, never anything else.

Pure: bytes in, a message out.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
MAX_NAME = 255  # bytes of a name in wire form (RFC 1035)
MAX_POINTERS = 32  # compression pointers followed in one name
MAX_RECORDS = 64  # answer records read from one message

TYPES = {
    1: "A",
    2: "NS",
    5: "CNAME",
    6: "SOA",
    12: "PTR",
    15: "MX",
    16: "TXT",
    28: "AAAA",
    33: "SRV",
    64: "SVCB",
    65: "HTTPS",
    255: "ANY",
}
RCODES = {
    0: "NOERROR",
    1: "FORMERR",
    2: "SERVFAIL",
    3: "NXDOMAIN",
    4: "NOTIMP",
    5: "REFUSED",
    6: "YXDOMAIN",
    7: "YXRRSET",
    8: "NXRRSET",
    9: "NOTAUTH",
    10: "NOTZONE",
}
FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3


# A DNS message over TCP longer than the segment that starts it: the kernel does not
# reassemble a stream, so the answers past that segment were not read there (none of their
# addresses was learnt, nor allowed under --enforce). The start of DnsEvent.error then.
SPLIT = "the message continues in a later TCP segment"


def split_error(seen: int, full: int) -> str:
    """DnsEvent.error for a TCP message of `full` bytes of which a segment held `seen`."""
    return f"{SPLIT} ({seen} of its {full} bytes in the first): answers past them were not learnt"


class DnsError(ValueError):
    """A DNS message that cannot be read: says where and why."""


def type_name(qtype: int) -> str:
    return TYPES.get(qtype, f"TYPE{qtype}")


def rcode_name(rcode: int) -> str:
    return RCODES.get(rcode, f"RCODE{rcode}")


@dataclass(slots=True)
class Answer:
    name: str  # owner name, lower-case, without the trailing dot
    type: str  # "A", "AAAA", "CNAME", ... or "TYPE<n>"
    ttl: int
    data: str  # an address, a CNAME's target, else "" (not interpreted)


@dataclass(slots=True)
class Message:
    id: int
    response: bool
    rcode: int
    query_name: str  # "" when the message has no question
    query_type: str
    answers: list[Answer] = field(default_factory=list)
    truncated: bool = False  # the TC bit: the answer continues over TCP

    @property
    def addresses(self) -> list[str]:
        """The A and AAAA answers that belong to the question: the question's own, and those
        of each name the CNAME chain from it leads to (in the order the chain goes)."""
        chain = self.chain()
        owners = set(chain)
        return [a.data for a in self.answers if a.type in ("A", "AAAA") and a.name in owners]

    def chain(self) -> list[str]:
        """The question name and the names its CNAMEs lead to, in order (cycles cut)."""
        cnames = {a.name: a.data for a in self.answers if a.type == "CNAME"}
        out = [self.query_name]
        while out[-1] in cnames and cnames[out[-1]] not in out and len(out) <= MAX_RECORDS:
            out.append(cnames[out[-1]])
        return out

    def min_ttl(self) -> int:
        """The shortest TTL of the answers that make up the question's addresses."""
        ttls = [a.ttl for a in self.answers if a.type in ("A", "AAAA", "CNAME")]
        return min(ttls) if ttls else 0


def _name(msg: bytes, off: int) -> tuple[str, int]:
    """The name at `off` (lower-case, dotted, no trailing dot; "" for the root) and the offset
    after it in the message (pointers followed only backwards, MAX_POINTERS at most)."""
    labels: list[str] = []
    end = -1
    size = 0
    pointers = 0
    while True:
        if off >= len(msg):
            raise DnsError(f"name runs past the message's end at offset {off}")
        length = msg[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise DnsError(f"compression pointer cut at offset {off}")
            target = (length & 0x3F) << 8 | msg[off + 1]
            if end < 0:
                end = off + 2
            if target >= off or pointers >= MAX_POINTERS:
                raise DnsError(f"compression pointer at offset {off} does not point back")
            pointers += 1
            off = target
            continue
        if length & 0xC0:
            raise DnsError(f"label type {length >> 6} at offset {off} is not supported")
        if length == 0:
            return ".".join(labels), (end if end >= 0 else off + 1)
        label = msg[off + 1 : off + 1 + length]
        if len(label) < length:
            raise DnsError(f"label at offset {off} runs past the message's end")
        size += length + 1
        if size > MAX_NAME:
            raise DnsError(f"name at offset {off} is longer than {MAX_NAME} bytes")
        # Labels are bytes: what is not UTF-8 is kept escaped (\\xNN), never dropped.
        labels.append(label.decode("utf-8", "backslashreplace").lower())
        off += 1 + length


def parse(msg: bytes) -> Message:
    """A DNS message (without TCP's length prefix); DnsError when it cannot be read. An
    answer section cut short (the kernel captures up to 512 bytes) keeps the answers read."""
    if len(msg) < _HEADER.size:
        raise DnsError(f"message of {len(msg)} bytes is shorter than a DNS header")
    ident, flags, qdcount, ancount, _ns, _ar = _HEADER.unpack_from(msg)
    out = Message(
        id=ident,
        response=bool(flags & 0x8000),
        rcode=flags & 0x000F,
        query_name="",
        query_type="",
        truncated=bool(flags & 0x0200),
    )
    off = _HEADER.size
    for i in range(qdcount):
        name, off = _name(msg, off)
        if off + 4 > len(msg):
            raise DnsError("question cut short")
        qtype = struct.unpack_from("!H", msg, off)[0]
        off += 4
        if i == 0:
            out.query_name, out.query_type = name, type_name(qtype)
    for _ in range(min(ancount, MAX_RECORDS)):
        try:
            owner, off = _name(msg, off)
        except DnsError:
            if off >= len(msg):
                break  # cut by the capture
            raise
        if off + _RR.size > len(msg):
            break
        rtype, _cls, ttl, rdlen = _RR.unpack_from(msg, off)
        off += _RR.size
        rdata = msg[off : off + rdlen]
        if len(rdata) < rdlen:
            break
        data = ""
        if rtype == 1 and rdlen == 4:
            data = str(ipaddress.IPv4Address(rdata))
        elif rtype == 28 and rdlen == 16:
            data = str(ipaddress.IPv6Address(rdata))
        elif rtype == 5:
            data, _ = _name(msg, off)
        out.answers.append(Answer(owner, type_name(rtype), ttl, data))
        off += rdlen
    return out


def wire_name(name: str) -> bytes:
    """A dotted name in wire form without the root's 0, ASCII letters lowered: what the
    kernel hashes. Labels that are not ASCII are taken as UTF-8."""
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            raw = label.encode("utf-8")
            out += bytes((len(raw),)) + raw
    return out


def _fnv(data: bytes, h: int = FNV64_OFFSET) -> int:
    for c in data:
        h = ((h ^ c) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def name_hash(name: str) -> int:
    """The kernel's hash of a question name (bpf/include/flows.h, dns_name_hash): each label
    hashed alone, FNV-1a 64 over its length byte and its bytes (ASCII upper-case letters
    lowered); the labels' hashes folded from the last to the first, h = (h ^ label) * prime.
    Folded from the right, the hash of each domain above a name comes on the way to the
    name's own: the kernel looks wildcards up with them."""
    wire = wire_name(name)
    labels: list[int] = []
    pos = 0
    while pos < len(wire):
        raw = wire[pos : pos + 1 + wire[pos]]
        labels.append(_fnv(bytes(c + 0x20 if 0x41 <= c <= 0x5A else c for c in raw)))
        pos += len(raw)
    h = FNV64_OFFSET
    for label in reversed(labels):
        h = ((h ^ label) * FNV64_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h
