"""What the first bytes of a flow say beyond its protocol: a TLS ClientHello's server name,
an HTTP request's Host, a Stratum request's method.

The kernel tells the protocol (bpf/include/flows.h, enum app_protocol) and hands over up to
FLOW_PAYLOAD_MAX bytes; here the details are read. The bytes are the sandboxed process's:
every length is checked, a name is at most 255 bytes, and anything malformed gives "" (a
flow is never dropped for what it carries).

Pure: bytes in, strings out.
"""

from __future__ import annotations

import json
import re
import struct

MAX_HOST = 255

_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r\n]{0,255})", re.IGNORECASE)
_METHOD = re.compile(rb'"method"\s*:\s*"([A-Za-z0-9_.]{1,64})"')
STRATUM_METHODS = ("login", "mining.subscribe", "mining.authorize")


def _text(raw: bytes) -> str:
    return raw[:MAX_HOST].decode("utf-8", "backslashreplace")


def tls_server_name(payload: bytes) -> str:
    """The server_name (SNI) of a TLS ClientHello at the start of `payload`, "" when there is
    none or the bytes run out before it (a ClientHello larger than the capture)."""
    try:
        return _sni(payload)
    except (struct.error, IndexError):
        return ""


def _sni(p: bytes) -> str:
    # record header (5), handshake header (4), version (2), random (32)
    if len(p) < 43 or p[0] != 0x16 or p[5] != 0x01:
        return ""
    off = 43
    off += 1 + p[off]  # session id
    (n,) = struct.unpack_from("!H", p, off)
    off += 2 + n  # cipher suites
    off += 1 + p[off]  # compression methods
    (ext_len,) = struct.unpack_from("!H", p, off)
    off += 2
    end = min(len(p), off + ext_len)
    while off + 4 <= end:
        etype, elen = struct.unpack_from("!HH", p, off)
        off += 4
        if etype == 0:  # server_name: list length, then (type, length, name)...
            body = p[off : off + elen]
            pos = 2
            while pos + 3 <= len(body):
                ntype, nlen = body[pos], struct.unpack_from("!H", body, pos + 1)[0]
                name = body[pos + 3 : pos + 3 + nlen]
                if ntype == 0 and len(name) == nlen:
                    return _text(name).lower()
                pos += 3 + nlen
            return ""
        off += elen
    return ""


def http_host(payload: bytes) -> str:
    """The Host header of an HTTP/1 request at the start of `payload`, "" when not seen; the
    authority of a CONNECT request line when it has no Host."""
    m = _HOST.search(payload)
    if m:
        return _text(m.group(1).strip()).lower()
    if payload.startswith(b"CONNECT "):
        target = payload[8:].split(b" ", 1)[0]
        return _text(target).lower()
    return ""


def http_request_line(payload: bytes) -> str:
    """The request line ("GET /path HTTP/1.1"), at most 255 bytes."""
    return _text(payload.split(b"\r\n", 1)[0])


def stratum_method(payload: bytes) -> str:
    """The method of a Stratum (JSON-RPC) request: "login", "mining.subscribe", ...; "" when
    none is seen."""
    line = payload.split(b"\n", 1)[0]
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        obj = None
    method = obj.get("method") if isinstance(obj, dict) else None
    if isinstance(method, str):
        return method[:64]
    m = _METHOD.search(payload)  # a request longer than the capture
    return m.group(1).decode("ascii") if m else ""
