#!/usr/bin/python3
"""A small authoritative DNS server for tests: UDP and TCP, a zone from a JSON file.

    dns_server.py --bind ADDR --port 53 --zone zone.json --log queries.jsonl

zone.json maps lower-case names to records: {"www.example.test": {"A": ["198.51.100.1"],
"AAAA": ["2001:db8::1"], "CNAME": "edge.example.net", "TTL": 60}}. A name with a CNAME is
answered with the chain and the target's addresses (as a recursive resolver would); a name
not in the zone is NXDOMAIN. With "ROTATE": true a name is answered with one of its addresses,
the next one at each query. With "TCP_SPLIT": N a TCP answer for the name is sent in two
segments, its first N bytes (the length prefix included) then the rest a moment later. Each
query is a line in the log. Standard library only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import socket
import socketserver
import struct
import threading
import time
from pathlib import Path
from typing import Any

TYPES = {"A": 1, "CNAME": 5, "AAAA": 28}


def read_name(msg: bytes, off: int) -> tuple[str, int]:
    labels = []
    while msg[off]:
        n = msg[off]
        labels.append(msg[off + 1 : off + 1 + n].decode("ascii", "replace"))
        off += 1 + n
    return ".".join(labels).lower(), off + 1


def wire(name: str) -> bytes:
    return b"".join(bytes((len(p),)) + p.encode() for p in name.split(".") if p) + b"\0"


def answer(query: bytes, zone: dict[str, Any], turn: int = 0) -> tuple[bytes, str, int]:
    ident, _flags, qd = struct.unpack_from("!HHH", query)
    name, off = read_name(query, 12)
    qtype = struct.unpack_from("!H", query, off)[0]
    question = query[12 : off + 4]
    records = []
    rcode = 0
    owner, owner_off = name, 12
    if name not in zone:
        rcode = 3
    while owner in zone:
        entry = zone[owner]
        ttl = int(entry.get("TTL", 60))
        ptr = struct.pack("!H", 0xC000 | owner_off)
        if "CNAME" in entry:
            target = entry["CNAME"]
            rdata = wire(target)
            records.append(ptr + struct.pack("!HHIH", 5, 1, ttl, len(rdata)) + rdata)
            # the target's name follows in the message: the next owner points at it
            owner_off = 12 + len(question) + sum(map(len, records)) - len(rdata)
            owner = target
            continue
        for rtype, family in (("A", socket.AF_INET), ("AAAA", socket.AF_INET6)):
            if TYPES[rtype] != qtype:
                continue
            addrs = entry.get(rtype, [])
            if entry.get("ROTATE") and addrs:
                addrs = [addrs[turn % len(addrs)]]
            for addr in addrs:
                rdata = socket.inet_pton(family, str(ipaddress.ip_address(addr)))
                records.append(ptr + struct.pack("!HHIH", TYPES[rtype], 1, ttl, len(rdata)))
                records[-1] += rdata
        break
    flags = 0x8400 | 0x0100 | 0x0080 | rcode  # response, authoritative, RD and RA
    header = struct.pack("!HHHHHH", ident, flags, qd, len(records), 0, 0)
    return header + question + b"".join(records), name, qtype


class Server:
    def __init__(self, zone: dict[str, Any], log: Path) -> None:
        self.zone = zone
        self.log = log
        self.lock = threading.Lock()
        self.turn = 0

    def handle(self, query: bytes, peer: str, proto: str) -> bytes:
        return self.handle_split(query, peer, proto)[0]

    def handle_split(self, query: bytes, peer: str, proto: str) -> tuple[bytes, int]:
        """The reply, and where a TCP reply is split (0: it is not)."""
        with self.lock:
            self.turn += 1
            turn = self.turn
        reply, name, qtype = answer(query, self.zone, turn)
        with self.lock, self.log.open("a") as f:
            f.write(json.dumps({"ts": time.time(), "peer": peer, "proto": proto,
                                "name": name, "type": qtype}) + "\n")  # fmt: skip
        return reply, int(self.zone.get(name, {}).get("TCP_SPLIT", 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bind", required=True)
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--zone", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    args = ap.parse_args()
    server = Server(json.loads(args.zone.read_text()), args.log)

    class Udp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            sock.sendto(server.handle(data, self.client_address[0], "udp"), self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            # each write its own segment: a split answer arrives in two
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                query = self.rfile.read(struct.unpack("!H", head)[0])
                reply, split = server.handle_split(query, self.client_address[0], "tcp")
                framed = struct.pack("!H", len(reply)) + reply
                if split:
                    self.wfile.write(framed[:split])
                    time.sleep(0.2)
                    framed = framed[split:]
                self.wfile.write(framed)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((args.bind, args.port), Udp)
    tcp = socketserver.ThreadingTCPServer((args.bind, args.port), Tcp)
    threading.Thread(target=udp.serve_forever, daemon=True).start()
    tcp.serve_forever()


if __name__ == "__main__":
    main()
