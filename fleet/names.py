"""What every part of a fleet on NATS JetStream agrees on: stream names, subjects and
message ids. Pure: no I/O (the connection is fleet/connect.py, the streams fleet/streams.py).

    collectors publish  sandtrace.events.<host>            -> stream SANDTRACE_EVENTS,
                        stored as sandtrace.part.<p>.<host>   p = partition(N, host)
    workers publish     sandtrace.alerts.<host>            -> stream SANDTRACE_ALERTS
                        sandtrace.siem.<schema>.<host>     -> stream SANDTRACE_SIEM

A host name becomes one subject token (host_token): letters, digits and '-' stay, every
other byte is '_' and two hex digits, so a dot (a token separator), a wildcard or a space in
a host name cannot change which subject a batch goes to, and two hosts never share a token.

Message ids (the Nats-Msg-Id header; JetStream drops a second message with an id it has
seen within the stream's duplicate window) are derived from the input alone: a batch is
`<collector>:<seq>`, the i-th alert a batch raised `<collector>:<seq>:a<i>` (fold summaries
not counted), the summary of the repeats folded into an alert `<that alert's id>:s` (the
same whether a batch or the end of the fold window brought it out), the SIEM lines of a
batch `<collector>:<seq>:<schema>`. A batch handled twice (redelivered after a worker died)
therefore publishes the same ids, and each output is stored once. An alert's own id
(alert_uuid) is derived from its message id the same way, so an alert raised again by a
new owner has the id of the one in the stream, and a summary names it.
"""

from __future__ import annotations

import hashlib
import re
import uuid

EVENTS_STREAM = "SANDTRACE_EVENTS"
ALERTS_STREAM = "SANDTRACE_ALERTS"
SIEM_STREAM = "SANDTRACE_SIEM"
LEASES_BUCKET = "sandtrace-partitions"
EXPIRY_BUCKET = "sandtrace-expiry"  # per partition: how far its fold windows were ended

EVENTS_PREFIX = "sandtrace.events"
PARTITION_PREFIX = "sandtrace.part"
ALERTS_PREFIX = "sandtrace.alerts"
SIEM_PREFIX = "sandtrace.siem"

# headers beside a batch: what the collector still holds (the service's Sandtrace-* headers)
SPOOL_BYTES_HEADER = "Sandtrace-Spool-Bytes"
HELD_BATCHES_HEADER = "Sandtrace-Held-Batches"
MSG_ID_HEADER = "Nats-Msg-Id"

_KEEP = re.compile(rb"[A-Za-z0-9-]")


def host_token(host: str) -> str:
    """A host name as one subject token, reversibly (host_of_token)."""
    out = []
    for byte in host.encode("utf-8", "surrogateescape"):
        char = bytes((byte,))
        out.append(char.decode() if _KEEP.fullmatch(char) else f"_{byte:02x}")
    return "".join(out) or "_"


def host_of_token(token: str) -> str:
    """The host name a host_token() stands for."""
    if token == "_":  # noqa: S105 (a subject token, not a secret)
        return ""
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogateescape")


def events_subject(host: str) -> str:
    """Where a collector publishes the batches of `host`."""
    return f"{EVENTS_PREFIX}.{host_token(host)}"


def partition_subject(partition: int | str) -> str:
    """What a partition's consumer reads: every host mapped to it."""
    return f"{PARTITION_PREFIX}.{partition}.*"


def partition_transform(partitions: int) -> tuple[str, str]:
    """The events stream's subject transform (source, destination): nats-server hashes the
    host token (FNV-1a) into one of `partitions` partitions as it stores the batch, so a host
    is always in the same partition, whichever collector or server took its batch."""
    return (
        f"{EVENTS_PREFIX}.*",
        f"{PARTITION_PREFIX}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}",
    )


def partition_of_subject(subject: str) -> int:
    """The partition of a stored batch's subject (sandtrace.part.<p>.<host>)."""
    return int(subject.split(".")[2])


def fnv1a_partition(host: str, partitions: int) -> int:
    """The partition nats-server's partition() gives `host` (32-bit FNV-1a of its token)."""
    h = 0x811C9DC5
    for byte in host_token(host).encode():
        h = ((h ^ byte) * 0x01000193) & 0xFFFFFFFF
    return h % partitions


def alerts_subject(host: str) -> str:
    return f"{ALERTS_PREFIX}.{host_token(host)}"


def siem_subject(schema: str, host: str) -> str:
    return f"{SIEM_PREFIX}.{schema}.{host_token(host)}"


def batch_msg_id(collector: str, seq: int) -> str:
    return f"{collector}:{seq}"


def alert_msg_id(collector: str, seq: int, index: int) -> str:
    """The index-th alert raised by handling batch (collector, seq)."""
    return f"{collector}:{seq}:a{index}"


def siem_msg_id(collector: str, seq: int, schema: str) -> str:
    return f"{collector}:{seq}:{schema}"


def summary_msg_id(folded_alert_id: str) -> str:
    """The fold summary of the repeats folded into the alert `folded_alert_id`: one per
    fold, whichever worker and whichever path (a batch, the window's end) brings it out."""
    return f"{folded_alert_id}:s"


def alert_uuid(msg_id: str, time_ns: int) -> str:
    """An alert's id derived from its message id: a UUIDv7 (api/ids.py's layout) with the
    millisecond of the alert's event and 74 bits of the SHA-256 of `msg_id`. Unique as the
    message ids are (a collector id is random), and the same each time a batch is handled."""
    digest = int.from_bytes(hashlib.sha256(msg_id.encode()).digest()[:10], "big")
    ms = (time_ns // 1_000_000) & ((1 << 48) - 1)
    value = (
        ms << 80 | 0x7 << 76 | (digest >> 68 & 0xFFF) << 64 | 0b10 << 62 | digest & ((1 << 62) - 1)
    )
    return str(uuid.UUID(int=value))
