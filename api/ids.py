"""Alert identifiers: UUIDv7 (RFC 9562), unique across hosts, runs and restarts.

A time-ordered id sorts by when it was made, so a SIEM's index on it stays local, and two
engines (a collector's, the service's, one after a restart) cannot make the same one: 74 of
its bits are random. Within one process the 12 bits after the millisecond count up, so ids
made in one millisecond still sort in the order they were made.
"""

from __future__ import annotations

import os
import threading
import time
import uuid


class _Counter:
    """The millisecond the last id was made in and the count within it (one per process)."""

    __slots__ = ("last_ms", "lock", "seq")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_ms = 0
        self.seq = 0


_counter = _Counter()


def uuid7(now_ns: int | None = None) -> str:
    """A new UUIDv7 as its canonical string (8-4-4-4-12 lower-case hex)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    c = _counter
    with c.lock:
        if ms <= c.last_ms:  # same millisecond (or the clock stepped back): count on
            c.seq += 1
            if c.seq > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
                c.last_ms += 1
                c.seq = 0
            ms = c.last_ms
        else:
            c.last_ms = ms
            c.seq = rand >> 68 & 0x7FF  # a random start leaves room to count up
        seq = c.seq
    value = (ms & (1 << 48) - 1) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | rand & (1 << 62) - 1
    return str(uuid.UUID(int=value))
